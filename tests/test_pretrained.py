"""RobustBench zoo models as grid cells (method ``pretrained``): config checks, the train job that loads instead of
training, evaluation reproducing the zoo model's own predictions, and a real Snakemake grid beside an rpat cell."""

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from zoo_fixtures import write_imagefolder, write_zoo_checkpoint

from rpat import accuracy, catalog, checkpoint, config, train
from rpat.jobs import evaluate
from rpat.models.robustbench import ZooFileMissing, catalog_entries, load_robustbench
from rpat.objectives.pretrained import IncompatibleData

ROOT = Path(__file__).resolve().parents[1]
CELL = "imagefolder/robustbench:Wong2020Fast/linf/pretrained/seed0"


def zoo_config(images: Path, model_dir: Path, **changes) -> dict:
    """An imagefolder grid with an rpat cell (CNN, PGD-AT+RPAT) and the RobustBench cell CELL; tiny settings."""
    raw = {
        "experiment": "zoo-e2e",
        "grid": [
            {"dataset": ["imagefolder"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [True],
             "seed": [0]},
            {"dataset": ["imagefolder"], "model": ["robustbench:Wong2020Fast"], "norm": ["linf"],
             "method": ["pretrained"], "rpat": [False], "seed": [0]},
        ],
        "data": {"paths": {"imagefolder": str(images)}, "val_size": 10, "augment": "none", "batch_size": 16},
        "threat": {"linf": {"eps": "8/255", "step": "2/255", "steps": 2}},
        "train": {"epochs": 1, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 2},
        "methods": {"pretrained": {"model_dir": str(model_dir), "dataset": "cifar10"}},
        "eval": {"n_examples": 20, "pgd_steps": 3, "cw_steps": 3, "autoattack": {"enabled": False}},
    }
    return config.deep_merge(raw, changes)


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    images = write_imagefolder(root / "images")
    path, state = write_zoo_checkpoint(root / "models")
    return images, root / "models", path, state


def error_of(raw) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.from_dict(raw)
    return str(e.value)


def _grid(model="robustbench:Wong2020Fast", method="pretrained", norm="linf", rpat=False, dataset="cifar10"):
    return {"experiment": "t", "grid": [{"dataset": [dataset], "model": [model], "norm": [norm], "method": [method],
                                         "rpat": [rpat], "seed": [0]}]}


def test_every_supported_entry_is_a_valid_model_name():
    names = sorted(catalog_entries())
    assert len(names) == 10 and "robustbench:Rice2020Overfitting" in names  # 12 entries, 2 under Linf and L2
    assert set(names) <= set(catalog.catalog()["models"])
    cfg = config.from_dict({"experiment": "t", "grid": [
        {"dataset": ["cifar10"], "model": names, "norm": ["linf"], "method": ["pretrained"], "rpat": [False],
         "seed": [0]},
        {"dataset": ["cifar10"], "model": ["robustbench:Standard", "robustbench:Rice2020Overfitting"],
         "norm": ["l2"], "method": ["pretrained"], "rpat": [False], "seed": [0]}]})
    assert len(cfg.cells()) == 12


def test_pretrained_refuses_rpat_and_models_that_are_not_zoo_entries():
    msg = error_of(_grid(rpat=True))
    assert "method 'pretrained' has no RPAT variant" in msg
    msg = error_of(_grid(model="preact_resnet18"))
    assert "method pretrained evaluates RobustBench models" in msg and "'preact_resnet18' is not one" in msg


def test_zoo_models_refuse_methods_that_train():
    msg = error_of(_grid(method="trades"))
    assert "robustbench:Wong2020Fast is a pretrained RobustBench model" in msg and "method: [pretrained]" in msg


def test_unknown_zoo_entry_is_a_schema_error():
    msg = error_of(_grid(model="robustbench:Nobody2099"))
    assert "grid[0].model[0]: 'robustbench:Nobody2099' is not allowed" in msg and "robustbench:Wong2020Fast" in msg


def test_norm_picks_the_entrys_threat_model_and_other_norms_need_saying_so():
    msg = error_of(_grid(norm="l2"))
    assert "no supported entry cifar10/L2/Wong2020Fast" in msg
    assert "evaluate it in a linf cell, or set methods.pretrained.threat_model: Linf" in msg
    cfg = config.from_dict({**_grid(norm="l2"), "methods": {"pretrained": {"threat_model": "Linf"}}})
    assert cfg.settings(cfg.cells()[0]).method["threat_model"] == "Linf"


def test_a_data_set_the_zoo_lacks_needs_the_zoo_data_set():
    msg = error_of(_grid(dataset="imagefolder"))
    assert "no supported entry imagefolder/Linf/Wong2020Fast" in msg
    assert "set methods.pretrained.dataset to the zoo data set it was trained on (cifar10)" in msg


def test_fingerprints_of_pretrained_cells_follow_their_source_data_and_threat_not_the_training_recipe():
    cfg = config.from_dict({"experiment": "t", "grid": [_grid()["grid"][0], _grid("cnn", "pgd_at")["grid"][0]]})
    zoo_cell, cnn_cell = cfg.cells()

    def changed(**sections) -> tuple[bool, bool]:
        other = config.from_dict({**cfg.raw, **sections})
        return tuple(cfg.settings(c).train_fingerprint != other.settings(c).train_fingerprint
                     for c in (zoo_cell, cnn_cell))

    assert changed(methods={"pretrained": {"model_dir": "elsewhere"}}) == (True, False)
    assert changed(train={"epochs": 3}) == (False, True)  # re-evaluating zoo models costs hours: not for this
    assert changed(threat={"linf": {"eps": 0.1}}) == (True, True)  # the attacks evaluation runs
    assert changed(data={"root": "elsewhere"}) == (True, True)  # the test examples


def _cell_settings(images, model_dir, **changes):
    cfg = config.from_dict(zoo_config(images, model_dir, tracking={"enabled": False}, **changes))
    return cfg, cfg.settings(cfg.cell(CELL))


def test_train_job_loads_the_zoo_file_and_evaluation_reproduces_the_zoo_model(zoo_files, tmp_path, capsys):
    images, model_dir, zoo_file, state = zoo_files
    cfg, s = _cell_settings(images, model_dir, threat={"linf": {"eps": "4/255"}},
                            eval={"n_examples": 10, "pgd_steps": 1, "cw_steps": 1})
    run_dir = tmp_path / "run"
    record = train.train(s, run_dir, tracking=cfg.tracking)
    assert "evaluated at eps=0.0156863, the cell's; the leaderboard ranks Linf entries at eps=0.0313725" in \
        capsys.readouterr().err

    assert record["history"] == [] and json.loads((run_dir / "train.json").read_text()) == record
    sel = record["selection"]
    assert (sel["rule"], sel["best_epoch"], sel["source"]["architecture"]) == ("pretrained", 0, "PreActResNet-18")
    assert sel["source"]["sha256"] == hashlib.sha256(zoo_file.read_bytes()).hexdigest()
    assert sel["source"]["params"] == 11_171_146 and sel["source"]["path"] == str(zoo_file)
    assert os.path.samefile(run_dir / "checkpoint-best.pt", run_dir / "checkpoint-last.pt")
    ckpt = checkpoint.load(run_dir / "checkpoint-best.pt")
    assert (ckpt["model_name"], ckpt["epoch"], ckpt["fingerprint"]) == (s.cell.model, 0, s.train_fingerprint)
    assert ckpt["zoo_entry"] == {"dataset": "cifar10", "threat_model": "Linf", "name": "Wong2020Fast"}
    assert ckpt["model"].keys() == {"net." + k for k in state}  # rpat's Normalized wrapper around the zoo net
    assert all(torch.equal(ckpt["model"]["net." + k], v) for k, v in state.items())  # the zoo file's weights

    result = evaluate.evaluate_cell(cfg, s.cell, run_dir)
    zoo_model, _ = load_robustbench("Wong2020Fast", model_dir=model_dir)  # the zoo's model, not via rpat's cell
    x, y, _ = evaluate.evaluated_examples(s)
    clean = 100.0 * float(accuracy.correct(zoo_model, x, y).sum()) / len(y)
    assert result["n_examples"] == 10 and result["clean"] == clean
    assert result["selection"]["rule"] == "pretrained" and result["eps"] == pytest.approx(4 / 255)
    assert 0 <= result["cw"] <= result["clean"] and result["pgd20"] <= result["clean"]

    assert train.train(s, run_dir, tracking=cfg.tracking) == record  # trained already: nothing to do
    assert "already trained with these settings" in capsys.readouterr().err


def test_data_of_another_shape_is_refused_before_loading(zoo_files, tmp_path):
    _, model_dir, _, _ = zoo_files
    images = write_imagefolder(tmp_path / "images", classes=3, train_per_class=6)
    cfg, s = _cell_settings(images, model_dir, data={"val_size": 2})
    with pytest.raises(IncompatibleData, match=r"classifies 10 classes of 3x32x32 images; data set 'imagefolder' "
                                               r"has 3 classes of 3x32x32 images"):
        train.train(s, tmp_path / "run", tracking=cfg.tracking)
    assert not (tmp_path / "run").exists()


def test_missing_zoo_file_names_its_path_and_writes_nothing(zoo_files, tmp_path):
    images, _, _, _ = zoo_files
    cfg, s = _cell_settings(images, tmp_path / "empty")
    with pytest.raises(ZooFileMissing, match=re.escape(str(tmp_path / "empty" / "cifar10" / "Linf" /
                                                           "Wong2020Fast.pt"))):
        train.train(s, tmp_path / "run", tracking=cfg.tracking)
    assert not (tmp_path / "run").exists()


def snakemake(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_example_config_plans_zoo_cells_beside_rpat_cells(tmp_path):
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "robustbench.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "results/robustbench/runs/cifar10/robustbench:Rice2020Overfitting/linf/pretrained/seed0/eval.json" \
        in out.stdout
    table = out.stdout.split("Job stats:")[1]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}
    assert counts == {"prepare_data": 1, "train": 4, "evaluate": 4, "perceive": 4, "report": 1, "all": 1}


@pytest.mark.slow
def test_snakemake_grid_tabulates_an_rpat_cell_beside_a_robustbench_cell(zoo_files, tmp_path):
    images, model_dir, _, _ = zoo_files
    raw = zoo_config(images, model_dir, eval={"n_examples": 12, "pgd_steps": 2, "cw_steps": 2})
    cfg_path = tmp_path / "zoo.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = snakemake("--cores", "2", "--configfile", str(cfg_path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    summary = pd.read_csv(tmp_path / "results" / "tables" / "summary.csv")
    assert sorted(summary.cell) == ["imagefolder/cnn/linf/pgd_at+rpat/seed0", CELL]
    assert list(summary.n_examples) == [12, 12] and summary.aa.isna().all()  # AutoAttack off: minutes on CPU
    for row in summary.itertuples():
        assert 0 <= row.cw <= row.clean <= 100 and 0 <= row.pgd20 <= row.clean
    md = (tmp_path / "results" / "tables" / "summary.md").read_text()
    assert "## imagefolder / robustbench:Wong2020Fast / linf" in md and re.search(r"^\| RobustBench +\|", md, re.M)

    zoo_row = summary[summary.cell == CELL].iloc[0]
    cfg = config.load(cfg_path)
    x, y, _ = evaluate.evaluated_examples(cfg.settings(cfg.cell(CELL)))
    zoo_model, _ = load_robustbench("Wong2020Fast", model_dir=model_dir)
    assert zoo_row.clean == pytest.approx(100.0 * float(accuracy.correct(zoo_model, x, y).sum()) / len(y), abs=1e-4)
    trained = json.loads((tmp_path / "results" / "runs" / CELL / "train.json").read_text())
    assert trained["selection"]["rule"] == "pretrained" and trained["history"] == []
