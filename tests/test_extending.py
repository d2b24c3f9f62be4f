"""The README's "Extending rpat" claims, checked: one registered entry is all a new measurement or objective needs
for the config, evaluation, MLflow and the tables to carry it."""

import json
from functools import partial

import pandas as pd
import pytest
import torch

from rpat import accuracy, attacks, catalog, config, objectives, report, train
from rpat.jobs import evaluate
from rpat.evaluation import measurements
from rpat.evaluation.measurements import EvalContext, Measurement, Outcome, _per_batch
from rpat.objectives import Objective
from rpat.objectives.baselines import adversarial_ce_loss, threat_pgd
from tiny import tiny_config


def fgsm(ctx: EvalContext) -> Outcome:
    """FGSM: one signed-gradient step of size eps from x (Goodfellow et al., 2015)."""
    t = ctx.threat
    return _per_batch(ctx, lambda x, y: accuracy.correct(ctx.model, attacks.pgd(
        ctx.model, x, y, eps=t.eps, step=t.eps, steps=1, norm=t.norm, init="none"), y))


@pytest.fixture
def fresh_catalog(monkeypatch, tmp_path):
    """Registries changed at run time: rebuild the catalog snapshot (in a private cache) before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    catalog.catalog.cache_clear()
    yield
    catalog.catalog.cache_clear()


def test_a_measurement_is_one_registered_entry(fresh_catalog, monkeypatch, tmp_path):
    monkeypatch.setitem(measurements.MEASUREMENTS, "fgsm", Measurement("fgsm", "FGSM", "accuracy under FGSM", fgsm))
    cfg = config.from_dict(tiny_config(results_dir=str(tmp_path), grid=[{**tiny_config()["grid"][0], "rpat": [False]}],
                                       tracking={"enabled": False}, eval={"autoattack": {"enabled": False}}))
    cell = cfg.cells()[0]
    run_dir = cfg.run_dir(cell)
    train.train_cell(cfg, cell, run_dir)
    res = evaluate.evaluate_cell(cfg, cell, run_dir)

    # the value: FGSM accuracy recomputed here on the same examples
    model, _ = evaluate.load_model(run_dir / "checkpoint-best.pt", "cpu")
    s = cfg.settings(cell)
    x, y, _ = evaluate.evaluated_examples(s)
    x_adv = attacks.pgd(model, x, y, eps=s.threat.eps, step=s.threat.eps, steps=1, norm="linf", init="none")
    expected = 100.0 * float(accuracy.correct(model, x_adv, y).sum()) / len(y)
    assert res["fgsm"] == expected
    assert json.loads((run_dir / "eval.json").read_text())["mlflow_metrics"]["test_fgsm"] == expected

    report.write_report(cfg)
    df = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert df.loc[0, "fgsm"] == pytest.approx(expected, abs=1e-4)
    assert "FGSM" in (tmp_path / "tables" / "summary.md").read_text()


def test_an_objective_is_one_registered_entry(fresh_catalog, monkeypatch, tmp_path):
    fgsm_attack = partial(threat_pgd, loss="ce", init="none")
    monkeypatch.setitem(objectives.OBJECTIVES, "fgsm_at", Objective(
        "fgsm_at", "FGSM-AT: CE on FGSM examples", fgsm_attack, adversarial_ce_loss, display="FGSM-AT"))
    raw = tiny_config(results_dir=str(tmp_path), grid=[{**tiny_config()["grid"][0], "method": ["fgsm_at"]}],
                      tracking={"enabled": False},
                      threat={"linf": {"steps": 1, "step": 0.3, "eps": 0.3}}, eval={"autoattack": {"enabled": False}})
    cfg = config.from_dict(raw)  # the schema's method enum now holds it
    for cell in cfg.cells():
        rec = train.train_cell(cfg, cell, cfg.run_dir(cell))
        assert rec["history"][-1]["loss_total"] > 0 and ("loss_rpat" in rec["history"][-1]) == cell.rpat
        evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    report.write_report(cfg)
    md = (tmp_path / "tables" / "summary.md").read_text()
    assert "FGSM-AT+RPAT" in md and "| FGSM-AT " in md
    # one FGSM step from x (no random start) is what the entry trains on
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x_adv = fgsm_attack(net, x, y, cfg.settings(cfg.cells()[0]).threat, {})
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x_req), y), x_req)
    assert torch.allclose(x_adv, (x + 0.3 * g.sign()).clamp(0, 1))
