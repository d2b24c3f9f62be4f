"""rpat.export and `rpat export`: digits cells exported in RobustBench's layout, loaded back, clean accuracy
reproduced (a hand-built cell in-process; a cell rpat trained and evaluated through the CLI)."""

import json
import shutil

import pytest
import torch
import yaml
from tiny import tiny_config

from rpat import accuracy, checkpoint, cli, config, data, files, models, train
from rpat.jobs import evaluate
from rpat.settings import Threat
from rpat.export import ExportError, eps_string, export_cell, model_info, percent_string

CELL = "digits/cnn/linf/pgd_at/seed0"
THREAT = Threat(norm="linf", eps=8 / 255, step=2 / 255, steps=0)
LEADERBOARD_KEYS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                    "architecture", "eps", "clean_acc", "reported", "autoattack_acc"]


def _clean_accuracy(model, splits) -> float:
    x, y = splits.test
    return accuracy.accuracies(model, data.Batches(data.to_float(x), y, 100), THREAT, steps=0)["clean"]


@pytest.fixture(scope="module")
def cell_dir(tmp_path_factory):
    """A trained cnn on digits, saved as rpat saves a cell: checkpoint (with model_meta), train.json, eval.json."""
    splits = data.load_splits("digits", {"val_size": 0})
    shape = {"num_classes": splits.num_classes, "in_channels": splits.channels, "image_size": splits.image_size,
             "mean": splits.mean, "std": splits.std}
    torch.manual_seed(0)
    model = models.build("cnn", **shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = splits.train
    for xb, yb in data.Batches(data.to_float(x), y, 64, shuffle=True):  # one epoch: 93.5% clean
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    clean = _clean_accuracy(model, splits)
    run_dir = tmp_path_factory.mktemp("cell")
    checkpoint.save({"model": model.state_dict(), "epoch": 3, "fingerprint": "test",
                     **models.meta("cnn", **shape)}, run_dir / "checkpoint-best.pt")
    files.write_json(run_dir / "train.json", {
        "cell": CELL, "dataset": "digits", "model": "cnn", "norm": "linf", "method": "pgd_at", "rpat": False,
        "seed": 0, "checkpoints": {"best": "checkpoint-best.pt", "last": "checkpoint-last.pt"}})
    files.write_json(run_dir / "eval.json", {
        "cell": CELL, "dataset": "digits", "checkpoint": "best", "n_examples": len(splits.test[1]), "norm": "linf",
        "eps": 8 / 255, "clean": clean, "aa": 37.25, "aa_version": "standard"})
    return run_dir, splits, clean


def test_export_reproduces_the_recorded_clean_accuracy(cell_dir, tmp_path):
    run_dir, splits, clean = cell_dir
    assert clean > 80  # trained: the weights matter
    out = export_cell(run_dir, tmp_path / "export", title="A test cell", link="https://example.org/paper")

    pt, js = (tmp_path / "export" / f"digits_cnn_linf_pgd_at_seed0.{ext}" for ext in ("pt", "json"))
    assert (out["pt"], out["json"]) == (str(pt), str(js))
    info = files.read_json(js)
    assert list(info) == LEADERBOARD_KEYS
    assert info == {"link": "https://example.org/paper", "name": "A test cell", "authors": "",
                    "additional_data": False,
                    "number_forward_passes": 1, "dataset": "digits", "venue": "", "architecture": "cnn",
                    "eps": "8/255", "clean_acc": str(round(clean, 2)), "reported": "37.25", "autoattack_acc": "37.25"}

    saved = torch.load(pt, map_location="cpu", weights_only=True)
    meta = saved["rpat_model"]
    model = models.build(meta["model_name"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                         image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    model.net.load_state_dict(saved["state_dict"])  # strict: the zoo layout holds the architecture's own keys
    assert _clean_accuracy(model.eval(), splits) == clean
    assert meta["mean"] == [0.5] and saved["epoch"] == 3


def test_export_refuses_a_checkpoint_eval_did_not_measure(cell_dir, tmp_path):
    run_dir, _, _ = cell_dir
    with pytest.raises(ExportError, match="did not measure its 'last' checkpoint .* export checkpoint 'best'"):
        export_cell(run_dir, tmp_path, checkpoint="last")
    assert not list(tmp_path.iterdir())


def test_export_needs_an_evaluated_cell(tmp_path):
    files.write_json(tmp_path / "train.json", {"cell": CELL})
    with pytest.raises(ExportError, match="eval.json does not exist; train and evaluate"):
        export_cell(tmp_path, tmp_path / "out")


def _records(**evaluation):
    tr = {"cell": "cifar10/preact_resnet18/linf/trades+rpat/seed1", "model": "preact_resnet18"}
    ev = {"cell": tr["cell"], "dataset": "cifar10", "eps": 8 / 255, "clean": 84.9151, "aa": 50.004,
          "n_examples": 10000, "aa_version": "standard", **evaluation}
    return tr, ev


def test_model_info_fields():
    info = model_info(*_records(), reported=51.0, venue="ICCV 2025", footnote="Trained with RPAT.")
    assert info["architecture"] == "PreActResNet-18" and info["name"] == "rpat cell " + _records()[0]["cell"]
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("84.92", "50.0", "51.0")
    assert info["footnote"] == "Trained with RPAT." and info["venue"] == "ICCV 2025"


def test_model_info_notes_departures_from_the_leaderboard_protocol():
    info = model_info(*_records(n_examples=1000, aa_version="rand"))
    assert info["footnote"] == ("Evaluated on the first 1000 test images, not 10,000. "
                                "AutoAttack version 'rand', not 'standard'.")


def test_model_info_needs_autoattack():
    with pytest.raises(ExportError, match="no AutoAttack accuracy"):
        model_info(*_records(aa=None))


def test_model_info_refuses_records_of_different_cells():
    tr, ev = _records()
    with pytest.raises(ExportError, match="re-run the cell's evaluation"):
        model_info(tr, {**ev, "cell": "cifar10/preact_resnet18/linf/trades/seed1"})


@pytest.mark.parametrize("eps,expected", [(8 / 255, "8/255"), (4 / 255, "4/255"), (0.031, "0.031"), (0.5, "0.5"),
                                          (128 / 255, "128/255")])
def test_eps_string(eps, expected):
    assert eps_string(eps) == expected


@pytest.mark.parametrize("acc,expected", [(85.3449, "85.34"), (58, "58.0"), (58.04, "58.04"), (0.0, "0.0"),
                                          (62.499, "62.5")])
def test_percent_string(acc, expected):
    assert percent_string(acc) == expected


def test_export_of_another_checkpoint_reads_its_own_evaluation(cell_dir, tmp_path):
    """eval-<checkpoint>.json holds the evaluation of a checkpoint other than the primary one."""
    run_dir, _, _ = cell_dir
    copy = tmp_path / "cell"
    shutil.copytree(run_dir, copy)
    shutil.copyfile(copy / "checkpoint-best.pt", copy / "checkpoint-last.pt")
    files.write_json(copy / "eval-last.json", {**files.read_json(copy / "eval.json"), "checkpoint": "last",
                                               "clean": 12.5, "aa": 10.0})
    info = export_cell(copy, tmp_path / "out", checkpoint="last")["info"]
    assert (info["clean_acc"], info["autoattack_acc"]) == ("12.5", "10.0")


@pytest.fixture(scope="module")
def evaluated_cell(tmp_path_factory):
    """A digits cell trained and evaluated (AutoAttack included) by rpat itself, from a config file. Standard
    training: a model AutoAttack breaks at once, so the test stays fast (a robust one keeps Square busy for minutes)."""
    root = tmp_path_factory.mktemp("cli")
    raw = tiny_config(results_dir=str(root / "results"), tracking={"enabled": False},
                      data={"batch_size": 32, "train_subset": 512, "val_size": 100}, train={"epochs": 3},
                      eval={"n_examples": 16, "autoattack": {"enabled": True}})
    raw["grid"] = [{**raw["grid"][0], "method": ["ce"], "rpat": [False]}]
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = config.load(cfg_path)
    cell = cfg.cells()[0]
    train.train_cell(cfg, cell, cfg.run_dir(cell))
    return cfg_path, cfg, cell, evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))


def test_cli_export_reproduces_the_evaluated_clean_accuracy(evaluated_cell, tmp_path, capsys):
    cfg_path, cfg, cell, result = evaluated_cell
    rc = cli.main(["export", "--config", str(cfg_path), "--cell", cell.id, "--out", str(tmp_path / "sub"),
                   "--title", "Tiny", "--venue", "Test 2026", "--reported", "40"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"pt": str(tmp_path / "sub" / "digits_cnn_linf_ce_seed0.pt"),
                   "json": str(tmp_path / "sub" / "digits_cnn_linf_ce_seed0.json")}
    info = files.read_json(out["json"])
    assert (info["name"], info["venue"], info["reported"]) == ("Tiny", "Test 2026", "40.0")
    assert info["clean_acc"] == percent_string(result["clean"])
    assert info["autoattack_acc"] == percent_string(result["aa"])
    assert info["eps"] == "0.3" and info["architecture"] == "cnn"

    saved = torch.load(out["pt"], map_location="cpu", weights_only=True)
    model = models.build_from_meta(saved["rpat_model"])
    model.net.load_state_dict(saved["state_dict"])
    x, y, _ = evaluate.evaluated_examples(cfg.settings(cell))
    assert result["clean"] > 50  # trained: the weights matter
    assert 100.0 * float(accuracy.correct(model.eval(), x, y).sum()) / len(y) == result["clean"]


def test_cli_export_refuses_a_cell_trained_with_other_settings(evaluated_cell, tmp_path, capsys):
    cfg_path, _, cell, _ = evaluated_cell
    changed = yaml.safe_load(cfg_path.read_text())
    changed["train"]["lr"] = 0.01
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert cli.main(["export", "--config", str(other), "--cell", cell.id, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rpat export: error:" in err and "other training settings" in err
    assert not (tmp_path / "x").exists()
