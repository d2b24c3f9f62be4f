"""Bad inputs get one line naming the problem (the file, line or key) and the fix, exit code 2, no traceback,
before any work: the table of docs/inputs.md, row by row, through the real CLI (``python -m rpat``) or the
real function. Also: result files survive a full disk (a real small tmpfs) and respect the umask."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tiny import tiny_config

from rpat import checkpoint, config, files, models
from rpat.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CELL = "digits/cnn/linf/pgd_at/seed0"


def write_config(tmp_path: Path, **changes) -> Path:
    raw = tiny_config(**{"results_dir": str(tmp_path / "results"), "tracking": {"enabled": False}, **changes})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rpat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpat", *args], capture_output=True, text=True, cwd=ROOT)


def error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The CLI's one error line (exit 2, no traceback)."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"rpat {command}: error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def image_folder(root: Path, classes=("cat", "dog"), n: int = 6) -> Path:
    for split, count in (("train", n), ("test", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 100 if c == "cat" else 200, 7)).save(d / f"{i}.png")
    return root


def folder_config(tmp_path: Path, folder: Path, **data) -> Path:
    grid = [{"dataset": ["imagefolder"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [False],
             "seed": [0]}]
    return write_config(tmp_path, grid=grid, data={"paths": {"imagefolder": str(folder)}, "val_size": 2, **data})


# ---------------------------------------------------------------------------------------------
# Config files


def yaml_case(text):
    def setup(tmp_path):
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
        return ["train", "--config", str(path), "--cell", CELL]
    return setup


def config_case(**changes):
    return lambda tmp_path: ["train", "--config", str(write_config(tmp_path, **changes)), "--cell", CELL]


# ---------------------------------------------------------------------------------------------
# Result files: train.json when evaluating, checkpoints, eval.json when reporting


def trained_record(tmp_path: Path) -> tuple[Path, Path]:
    """A config and a train.json for its cell (right fingerprint), without training."""
    cfg_path = write_config(tmp_path)
    cfg = config.load(cfg_path)
    cell = cfg.cell(CELL)
    record = {"cell": CELL, "fingerprint": cfg.settings(cell).train_fingerprint, "selection": {"split": "val"},
              "checkpoints": {"best": "checkpoint-best.pt", "last": "checkpoint-last.pt"}}
    files.write_json(cfg.run_dir(cell) / "train.json", record)
    return cfg_path, cfg.run_dir(cell) / "train.json"


def damaged_train_json(damage):
    def setup(tmp_path):
        cfg_path, record = trained_record(tmp_path)
        record.write_text(damage(record.read_text()))
        return ["evaluate", "--config", str(cfg_path), "--cell", CELL]
    return setup


def missing_train_json(tmp_path):
    return ["evaluate", "--config", str(write_config(tmp_path)), "--cell", CELL]


def mismatched_checkpoint(tmp_path):
    """A checkpoint whose recorded model (10 classes) is not the one its weights are for (12 classes)."""
    cfg_path, record = trained_record(tmp_path)
    net = models.build("cnn", num_classes=12, in_channels=1, image_size=8)
    meta = models.meta("cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.0], std=[1.0])
    checkpoint.save({"model": net.state_dict(), "epoch": 1, **meta}, tmp_path / "other.pt")
    return ["evaluate", "--config", str(cfg_path), "--cell", CELL, "--checkpoint", str(tmp_path / "other.pt")]


def eval_record(cell: config.Cell) -> dict:
    return {"cell": cell.id, **cell.coordinates(), "clean": 50.0, "pgd20": 20.0, "cw": 20.0, "aa": None,
            "n_examples": 16, "eps": 0.3, "checkpoint": "best", "selection": {"split": "val"}}


def report_case(damage):
    """Both cells evaluated; the +rpat cell's eval.json damaged."""
    def setup(tmp_path):
        cfg_path = write_config(tmp_path)
        cfg = config.load(cfg_path)
        for cell in cfg.cells():
            files.write_json(cfg.run_dir(cell) / "eval.json", eval_record(cell))
        path = cfg.run_dir(cfg.cells()[1]) / "eval.json"
        path.write_text(damage(path.read_text()))
        return ["report", "--config", str(cfg_path)]
    return setup


def other_cells_results(text):
    """The plain cell's results copied into the +rpat cell's folder."""
    return text.replace("pgd_at+rpat", "pgd_at").replace('"rpat": true', '"rpat": false')


TRUNCATED = {"truncated": lambda t: t[: len(t) // 2], "empty": lambda t: "", "null": lambda t: "null",
             "missing keys": lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "selection"})}
REPORT_DAMAGE = {**TRUNCATED, "missing keys": lambda t: json.dumps({k: v for k, v in json.loads(t).items()
                                                                     if k != "n_examples"})}

# ---------------------------------------------------------------------------------------------
# Data sets


def empty_class_folder(tmp_path):
    folder = image_folder(tmp_path / "folder")
    (folder / "train" / "bird").mkdir()
    return ["prepare-data", "--config", str(folder_config(tmp_path, folder)), "--dataset", "imagefolder"]


def corrupt_image(tmp_path):
    folder = image_folder(tmp_path / "folder")
    png = folder / "train" / "dog" / "3.png"
    png.write_bytes(png.read_bytes()[:40])
    return ["prepare-data", "--config", str(folder_config(tmp_path, folder)), "--dataset", "imagefolder"]


def missing_data_folder(tmp_path):
    return ["prepare-data", "--config", str(folder_config(tmp_path, tmp_path / "nowhere")), "--dataset",
            "imagefolder"]


def val_size_too_large(tmp_path):
    folder = image_folder(tmp_path / "folder")
    cfg_path = folder_config(tmp_path, folder, val_size=12)
    return ["train", "--config", str(cfg_path), "--cell", "imagefolder/cnn/linf/pgd_at/seed0"]


# name: (setup(tmp_path) -> CLI arguments, what the error line holds: {tmp} is tmp_path)
CASES = {
    "YAML syntax error": (yaml_case("experiment: x\ngrid: [1, 2\ntrain: {}\n"),
                          ["{tmp}/cfg.yaml, line 3, column 6: YAML syntax error", "opened at line 2",
                           "fix the indentation, brackets or quotes there"]),
    "YAML !!python tag": (yaml_case("experiment: !!python/object/apply:os.system ['echo pwned']\n"),
                          ["{tmp}/cfg.yaml, line 1, column 13: the YAML tag !!python/object/apply:os.system is not "
                           "allowed", "remove the tag"]),
    "YAML key given twice": (yaml_case("experiment: x\ntrain:\n  lr: 0.1\n  lr: 0.2\n"),
                             ["{tmp}/cfg.yaml, line 4, column 3: duplicate key 'lr'", "keep one"]),
    "lr: .nan": (config_case(train={"lr": float("nan")}),
                 ["{tmp}/cfg.yaml: invalid config: train.lr: nan is not a finite number", "give a number"]),
    "eps: .nan": (config_case(threat={"linf": {"eps": float("nan")}}),
                  ["invalid config: threat.linf.eps: nan is not a finite number", "give a number"]),
    "eps: -.inf": (config_case(threat={"linf": {"eps": float("-inf")}}),
                   ["threat.linf.eps: -inf is not a finite number"]),
    "eps_grid: pgd20 under l1": (config_case(eval={"eps_grid": [{"norm": "l1", "eps": [12], "attacks": ["pgd20"]}]}),
                                 ["invalid config: eval.eps_grid[0]: 'pgd20' does not measure under l1 (only linf, "
                                  "l2); l1 is measured by: aa (AutoAttack's L1 attacks)"]),
    "train.json missing": (missing_train_json,
                           ["{tmp}/results/runs/" + CELL + "/train.json does not exist",
                            "run its training first"]),
    **{f"train.json {k}": (damaged_train_json(d), ["{tmp}/results/runs/" + CELL + "/train.json ",
                                                    "delete it and rerun"]) for k, d in TRUNCATED.items()},
    "checkpoint of another shape": (mismatched_checkpoint,
                                    ["checkpoint {tmp}/other.pt does not fit the model",
                                     "has shape [12, ", "in the checkpoint, [10, ", "use this cell's checkpoint"]),
    **{f"eval.json {k}": (report_case(d), ["{tmp}/results/runs/digits/cnn/linf/pgd_at+rpat/seed0/eval.json ",
                                           "delete it and rerun"]) for k, d in REPORT_DAMAGE.items()},
    "eval.json of another cell": (report_case(other_cells_results),
                                  ["{tmp}/results/runs/digits/cnn/linf/pgd_at+rpat/seed0/eval.json holds the results "
                                   "of another cell", "rpat evaluate --cell digits/cnn/linf/pgd_at+rpat/seed0"]),
    "empty class folder": (empty_class_folder, ["class folder {tmp}/folder/train/bird holds no images", "To fix"]),
    "corrupt image": (corrupt_image, ["{tmp}/folder/train/dog/3.png: not a readable image", "To fix"]),
    "missing data folder": (missing_data_folder, ["imagefolder: expected {tmp}/nowhere/train/<class>/<images>",
                                                  "To fix: create that tree there, or point data.paths.imagefolder"]),
    "val_size too large": (val_size_too_large, ["data.val_size=12", "holds 12 examples",
                                                "To fix: set data.val_size below 12"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_it_and_the_fix(tmp_path, case):
    setup, expected = CASES[case]
    args = setup(tmp_path)
    line = error_line(rpat(*args), args[0])
    for fragment in expected:
        assert fragment.format(tmp=tmp_path) in line, line
    if args[0] in ("train", "evaluate"):  # refused before any work: no training state, no results
        assert not list((tmp_path / "results").rglob("*.pt")) and not list((tmp_path / "results").rglob("eval.json"))


def test_report_reads_each_eval_json_for_its_cell(tmp_path):
    """collect takes (cell, path) pairs, or paths read as the results of the cell whose folder holds them."""
    from rpat.report.tables import collect

    plain, rpat_cell = config.Cell.parse(CELL), config.Cell.parse("digits/cnn/linf/pgd_at+rpat/seed0")
    for cell in (plain, rpat_cell):
        files.write_json(tmp_path / "runs" / cell.id / "eval.json", eval_record(cell))
    path = tmp_path / "runs" / CELL / "eval.json"
    assert collect([(plain, path)]).cell.tolist() == [CELL]
    with pytest.raises(files.ResultFileError, match=re.escape(f"{path} holds the results of another cell (")):
        collect([(rpat_cell, path)])
    with pytest.raises(files.ResultFileError, match=re.escape(f"not {rpat_cell.id}; it was copied or moved")):
        collect([(rpat_cell, path)])
    loose = tmp_path / "elsewhere.json"  # outside a cell folder: its own coordinates must agree with its cell id
    loose.write_text(path.read_text().replace('"model": "cnn"', '"model": "resnet18"'))
    with pytest.raises(files.ResultFileError, match="model=resnet18.*cell digits/cnn/linf/pgd_at/seed0"):
        collect([loose])


def test_bad_tinyimagenet_archive_names_it_and_the_fix(tmp_path):
    from rpat.data import tinyimagenet

    archive = tmp_path / "tiny-imagenet-200.zip"
    archive.write_bytes(b"not the archive")
    with pytest.raises(UserError) as e:
        tinyimagenet.verify_archive(archive)
    assert str(e.value).startswith(f"tinyimagenet: {archive} is corrupt or not the official archive")
    assert "To fix: delete it" in str(e.value) and "\n" not in str(e.value)


def test_too_many_evaluation_examples_names_the_key():
    from rpat import data

    with pytest.raises(UserError, match=r"eval.n_examples=11, but the test set holds 10 examples. To fix: set "
                                        r"eval.n_examples to at most 10"):
        data.eval_subset(torch.arange(10) % 2, 11)


# ---------------------------------------------------------------------------------------------
# A full disk (a real 2 MiB tmpfs): one line, nothing corrupt left, earlier files intact


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until about ``leave`` bytes are free; returns the filler file."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def leftovers(disk: Path) -> list[str]:
    return [p.name for p in disk.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_keeps_the_previous_checkpoint_and_json(small_disk):
    ckpt, record = small_disk / "checkpoint-last.pt", small_disk / "train.json"
    checkpoint.save({"model": {"w": torch.arange(10.0)}}, ckpt)
    files.write_json(record, {"epoch": 1})
    before = ckpt.read_bytes()
    fill(small_disk, 64 * 1024)
    with pytest.raises(files.DiskFull, match=f"no space left on the device holding {ckpt}; free some space"):
        checkpoint.save({"model": {"w": torch.zeros(256 * 1024)}}, ckpt)  # 1 MiB
    with pytest.raises(files.DiskFull, match=f"no space left on the device holding {record}"):
        files.write_json(record, {"epoch": 2, "history": ["x" * 1000] * 200})
    assert ckpt.read_bytes() == before and torch.equal(checkpoint.load(ckpt)["model"]["w"], torch.arange(10.0))
    assert json.loads(record.read_text()) == {"epoch": 1}
    assert leftovers(small_disk) == []


def test_full_disk_image_cache_is_skipped_not_corrupted(small_disk, tmp_path):
    from rpat.data.folders import decode_imagefolder

    folder = image_folder(tmp_path / "folder", n=40)
    fill(small_disk, 4 * 1024)
    with pytest.warns(UserWarning, match="could not write image cache .*no space left"):
        x, y, classes = decode_imagefolder(folder / "train", cache_dir=small_disk / "cache")
    assert x.shape == (80, 3, 8, 8) and classes == ["cat", "dog"]
    assert not list((small_disk / "cache").glob("*.pt")) and leftovers(small_disk) == []


@pytest.mark.slow  # two training processes
def test_training_on_a_full_disk_stops_in_one_line_and_resumes_once_there_is_space(small_disk, tmp_path):
    cfg_path = write_config(tmp_path, results_dir=str(small_disk / "results"))
    filler = fill(small_disk, 1200 * 1024)  # room for the first epoch's state, not the second's
    line = error_line(rpat("train", "--config", str(cfg_path), "--cell", CELL), "train")
    assert "no space left on the device holding" in line and "free some space" in line, line
    assert leftovers(small_disk) == [] and not list(small_disk.rglob("train.json"))
    for pt in small_disk.rglob("*.pt"):  # whatever was saved is whole
        checkpoint.load(pt)
    state = checkpoint.load(next(small_disk.rglob("state/last.pt")))  # epoch 1's, kept when epoch 2's failed
    filler.unlink()
    out = rpat("train", "--config", str(cfg_path), "--cell", CELL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming at epoch {state['epoch'] + 1}" in out.stderr
    assert [h["epoch"] for h in json.loads(next(small_disk.rglob("train.json")).read_text())["history"]] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Result files are readable by collaborators: the umask applies


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        files.write_json(tmp_path / "eval.json", {"clean": 1.0})
        checkpoint.save({"model": {}}, tmp_path / "checkpoint-best.pt")
        files.write_text(tmp_path / "summary.md", "# x\n")
    finally:
        os.umask(previous)
    for name in ("eval.json", "checkpoint-best.pt", "summary.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
