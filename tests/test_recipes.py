"""The recipes compose with every objective ± RPAT (issue 12's acceptance): the recipe grid axis and its cells,
config checks, one tiny training step of every combination, and a bit-exact resume with EMA and AWP after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tiny import TINY, tiny_config, tiny_grid

from rpat import checkpoint, config, train
from rpat.cells import Cell
from rpat.objectives import OBJECTIVES

RECIPES = {
    "ema": {"train": {"weight_average": {"kind": "ema"}}},
    "swa": {"train": {"weight_average": {"kind": "swa", "swa_start": 1}}},
    "awp": {"train": {"awp": {"enabled": True, "gamma": 0.01, "warmup": 0}}},
    "awp0": {"train": {"awp": {"enabled": True, "gamma": 0.0, "warmup": 0}}},
}


def raw_config(method="pgd_at", rpat=(False,), recipe=("plain",), **sections) -> dict:
    """The tiny config with one cell per (rpat, recipe), one training step per epoch."""
    base = tiny_config(experiment="recipes", tracking={"enabled": False}, recipes=RECIPES,
                       grid=tiny_grid(method=[method], rpat=list(rpat), recipe=list(recipe)),
                       data={"val_size": 16, "train_subset": 32, "batch_size": 32},
                       threat={"linf": {"eps": 0.2, "step": 0.1, "steps": 1}},
                       train={"epochs": 1, "val_attack_steps": 1}, methods={"rebat": {"warmup_epoch": 1}})
    return config.deep_merge(base, sections)


# ---------------------------------------------------------------------------------------------
# The recipe axis


def test_recipe_is_a_grid_axis_whose_plain_value_keeps_the_old_paths():
    cfg = config.from_dict(raw_config(rpat=(False, True), recipe=("plain", "ema", "awp")))
    assert [c.id for c in cfg.cells()] == [
        "digits/cnn/linf/pgd_at/seed0", "digits/cnn/linf/pgd_at+ema/seed0", "digits/cnn/linf/pgd_at+awp/seed0",
        "digits/cnn/linf/pgd_at+rpat/seed0", "digits/cnn/linf/pgd_at+rpat+ema/seed0",
        "digits/cnn/linf/pgd_at+rpat+awp/seed0"]
    for cell in cfg.cells():
        assert Cell.parse(cell.id) == cell
        wildcards = dict(zip(("dataset", "model", "norm", "method", "seed"), cell.id.replace("/seed", "/").split("/")))
        assert Cell.from_wildcards(wildcards) == cell
    assert cfg.cell("digits/cnn/linf/pgd_at+rpat+ema/seed0").recipe == "ema"
    assert Cell.parse("d/m/linf/trades/seed1").recipe == "plain"
    for bad in ("d/m/linf/trades+plain/seed0", "d/m/linf/trades+rpat+rpat/seed0", "d/m/linf/trades+EMA/seed0"):
        with pytest.raises(config.CellError):
            Cell.parse(bad)
    assert cfg.cell("digits/cnn/linf/pgd_at+awp/seed0").tags()["recipe"] == "awp"


def test_a_recipe_overrides_the_block_set_and_only_its_cells():
    raw = raw_config(recipe=("plain", "ema"))
    raw["grid"][0]["set"] = {"train": {"weight_average": {"decay": 0.9, "kind": "swa", "swa_start": 1}, "lr": 0.2}}
    cfg = config.from_dict(raw)
    plain, ema = (cfg.settings(c) for c in cfg.cells())
    assert (plain.train.weight_average.kind, plain.train.weight_average.decay) == ("swa", 0.9)
    assert (ema.train.weight_average.kind, ema.train.weight_average.decay, ema.train.lr) == ("ema", 0.9, 0.2)


def test_cells_without_recipes_keep_their_fingerprints():
    """The recipe keys are left out of the fingerprint while off: cells trained before they existed are not
    retrained (the values were computed before the recipes were added)."""
    cfg = config.from_dict(TINY)
    assert [cfg.settings(c).train_fingerprint for c in cfg.cells()] == ["42a439c861566c50", "045ec7bfb7ba8dc5"]
    assert config.load("config/paper.yaml").settings(
        Cell("cifar10", "resnet18", "linf", "pgd_at", False, 0)).train_fingerprint == "4c0d8c29b535d778"
    both = config.from_dict(tiny_config(recipes=RECIPES, grid=tiny_grid(recipe=["plain", "ema"])))
    fingerprints = [both.settings(c).train_fingerprint for c in both.cells()]
    assert fingerprints[0] == "42a439c861566c50" and len(set(fingerprints)) == 4


@pytest.mark.parametrize("change, message", [
    ({"grid": [{"recipe": ["fancy"]}]}, "grid[0].recipe: 'fancy' is not defined"),
    ({"recipes": {"rpat": {}}}, "recipes: 'rpat' is reserved; reserved names: rpat, plain"),
    ({"recipes": {"Bad+Name": {}}}, "recipes: 'Bad+Name' does not match"),
    ({"grid": [{"method": ["rebat"], "recipe": ["ema"]}]}, "rebat keeps its own weight average"),
    ({"grid": [{"method": ["ce"], "recipe": ["awp"]}]}, "ce does not take AWP"),
    ({"grid": [{"recipe": ["swa"]}], "recipes": {"swa": {"train": {"weight_average": {"swa_start": 5}}}}},
     "swa_start=5 is after the last epoch"),
    ({"recipes": {"awp": {"train": {"awp": {"warmup": 1}}}}, "grid": [{"recipe": ["awp"]}]}, "leaves no epoch with AWP"),
    ({"train": {"eps_warmup_epochs": 2}}, "eps_warmup_epochs=2 exceeds"),
    ({"data": {"extra_fraction": 1.0}}, "data.extra_fraction"),
])
def test_impossible_recipes_are_config_errors_naming_the_key(change, message):
    raw = raw_config()
    grid = change.pop("grid", [{}])[0]
    raw["grid"][0].update(grid)
    raw = config.deep_merge(raw, change)
    with pytest.raises(config.ConfigError, match=re.escape(message)) as e:
        config.from_dict(raw)
    if "take AWP" in message:
        assert "pgd_at, trades, mart, consistency" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Every objective x {plain, EMA, SWA, AWP} x ± RPAT: one tiny step each


def combinations() -> list:
    """Every objective that trains (not the zoo's pretrained models) x RPAT x recipe."""
    return [pytest.param(name, rpat, recipe, id=f"{name}{'+rpat' if rpat else ''}+{recipe}")
            for name, obj in OBJECTIVES.items() if obj.provide is None
            for rpat in ([False, True] if obj.supports_rpat else [False]) for recipe in ("plain", "ema", "swa", "awp")]


def train_one(tmp_path, method, rpat, recipe):
    cfg = config.from_dict(raw_config(method, (rpat,), (recipe,)))
    cell = cfg.cells()[0]
    settings = cfg.settings(cell)
    init = train.setup(settings, threads=1).model.state_dict()  # the weights before the step (same seeding)
    record = train.train(settings, tmp_path / recipe, tracking={"enabled": False, "uri": None}, threads=1)
    state = torch.load(tmp_path / recipe / "state" / "last.pt", weights_only=True)
    selected = checkpoint.load(tmp_path / recipe / "checkpoint-last.pt")["model"]
    return record, init, state, selected


def assert_average(selected, init, online, d):
    """selected = d init + (1 - d) online for every float tensor; integer buffers are the online model's."""
    for k, v in selected.items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, d * init[k] + (1 - d) * online[k], rtol=1e-5, atol=1e-6), k
        else:
            assert torch.equal(v, online[k]), k


@pytest.mark.parametrize("method, rpat, recipe", combinations())
def test_every_recipe_composes_with_every_objective(tmp_path, method, rpat, recipe):
    obj = OBJECTIVES[method]
    if recipe in ("ema", "swa") and obj.uses_teacher:
        with pytest.raises(config.ConfigError, match="keeps its own weight average"):
            config.from_dict(raw_config(method, (rpat,), (recipe,)))
        return
    if recipe == "awp" and not obj.supports_awp:
        with pytest.raises(config.ConfigError, match="does not take AWP"):
            config.from_dict(raw_config(method, (rpat,), (recipe,)))
        return
    record, init, state, selected = train_one(tmp_path, method, rpat, recipe)
    h = record["history"][0]
    assert torch.isfinite(torch.tensor(h["loss_total"])) and ("loss_rpat" in h) == rpat
    online = state["model"]
    assert any(not torch.equal(init[k], online[k]) for k in online)  # the step moved the weights
    if recipe == "plain" and not obj.uses_teacher:
        assert all(torch.equal(selected[k], online[k]) for k in online)  # the model itself is selected
    elif recipe == "plain":  # ReBAT's teacher from warmup_epoch 1: d = 0.999, no ramp
        assert_average(selected, init, online, 0.999)
    elif recipe == "ema":  # the first update after the start: d = min(0.999, 1/10)
        assert_average(selected, init, online, 0.1)
        assert int(state["average"]["n_averaged"]) == 2
    elif recipe == "swa":  # the mean of the initial and the trained weights
        assert_average(selected, init, online, 0.5)
    else:  # AWP: gamma 0 is exactly plain training, gamma 0.01 is not
        _, _, zero, _ = train_one(tmp_path, method, rpat, "awp0")
        _, _, plain, _ = train_one(tmp_path, method, rpat, "plain")
        assert all(torch.equal(zero["model"][k], plain["model"][k]) for k in online)
        assert any(not torch.equal(online[k], plain["model"][k]) for k in online)


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL with EMA and AWP


def run_cli(cfg_path, cell, out, **popen):
    cmd = [sys.executable, "-m", "rpat", "train", "--config", str(cfg_path), "--cell", cell, "--out", str(out),
           "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_resume_with_ema_and_awp_is_bit_exact_after_sigkill(tmp_path):
    raw = raw_config("trades", (True,), ("ema_awp",), data={"train_subset": 192, "batch_size": 64},
                     train={"epochs": 4, "lr": 0.05})
    raw["recipes"]["ema_awp"] = {"train": {"weight_average": {"kind": "ema", "decay": 0.99},
                                           "awp": {"enabled": True, "gamma": 0.01, "warmup": 1}}}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cell = "digits/cnn/linf/trades+rpat+ema_awp/seed0"
    cfg = config.load(cfg_path)
    train.train(cfg.settings(cfg.cell(cell)), tmp_path / "straight", tracking=cfg.tracking, threads=1)

    killed = run_cli(cfg_path, cell, tmp_path / "killed")
    state = tmp_path / "killed" / "state" / "last.pt"
    deadline = time.time() + 240
    while not state.exists():
        assert killed.poll() is None, killed.stderr.read()
        assert time.time() < deadline, "no state was saved"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["epoch"] < 4 and not (tmp_path / "killed" / "train.json").exists()

    again = run_cli(cfg_path, cell, tmp_path / "killed")
    assert again.wait(timeout=300) == 0
    assert f"resuming at epoch {saved['epoch'] + 1}" in again.stderr.read()
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        a = checkpoint.load(tmp_path / "straight" / name)["model"]
        b = checkpoint.load(tmp_path / "killed" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sa = torch.load(tmp_path / "straight" / "state" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "killed" / "state" / "last.pt", weights_only=True)
    assert all(torch.equal(sa["average"][k], sb["average"][k]) for k in sa["average"])
    assert int(sb["average"]["n_averaged"]) == 4 * 3 + 1  # the initial copy and 3 steps per epoch
    ha, hb = (json.loads((tmp_path / d / "train.json").read_text())["history"] for d in ("straight", "killed"))
    assert [h["loss_total"] for h in ha] == [h["loss_total"] for h in hb]
    assert [h["val_pgd"] for h in ha] == [h["val_pgd"] for h in hb]


def test_every_training_key_is_documented_with_its_default_and_source():
    """docs/recipes.md's key table names every key of the data, threat, train, rpat and methods sections."""
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text().split(
        "## Config keys, defaults and sources")[1]
    keys = [f"data.{k}" for k in config.DEFAULTS["data"]] + [f"rpat.{k}" for k in config.DEFAULTS["rpat"]]
    keys += [f"train.{k}" for k, v in config.DEFAULTS["train"].items() if k not in ("weight_average", "awp")]
    keys += [f"train.{g}.{k}" for g in ("weight_average", "awp") for k in config.DEFAULTS["train"][g]]
    keys += [f"threat.{n}" for n in config.DEFAULTS["threat"]] + [f"methods.{m}" for m in config.DEFAULTS["methods"]]
    names = {part.strip("` ") for row in table.splitlines() if row.startswith("| `")
             for part in row.split("|")[1].split(",")}
    expanded = set(names)
    for name in names:  # "`methods.rebat.beta`, `.decay`" abbreviates the second key
        prefix = name.rsplit(".", 1)[0]
        expanded |= {prefix + n for n in names if n.startswith(".")}
    missing = [k for k in keys if not any(n == k or n.startswith(k + ".") for n in expanded)]
    assert not missing, f"keys without a row in docs/recipes.md: {missing}"
