"""`rpat perceive`: the perception job on a real trained tiny cell; its files, randomness, MLflow metrics, CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml

from rpat import accuracy, attacks, blocks, cli, config, perception, train
from rpat.jobs import evaluate, perceive
from rpat.errors import UserError

RAW = {
    "experiment": "perceive-unit",
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [False, True],
              "seed": [3]}],
    "data": {"val_size": 64, "train_subset": 128, "augment": "none", "batch_size": 64},
    "threat": {"linf": {"eps": 0.2, "step": 0.1, "steps": 2}},
    "train": {"epochs": 1, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 2},
    "eval": {"n_examples": 24, "pgd_steps": 3, "batch_size": 7, "perception_alphas": 5,
             "autoattack": {"enabled": False}},
}
CELL = config.Cell("digits", "cnn", "linf", "pgd_at", False, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained cell with a real MLflow store, analysed once: (cfg, run_dir, result)."""
    root = tmp_path_factory.mktemp("perceive")
    cfg = config.from_dict({**RAW, "results_dir": str(root / "results"),
                            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}})
    run_dir = cfg.run_dir(CELL)
    train.train_cell(cfg, CELL, run_dir)
    res = perceive.perceive(cfg.settings(CELL), run_dir / "train.json", run_dir / "perception.json",
                            tracking=cfg.tracking)
    return cfg, run_dir, res


def model_and_examples(cfg, run_dir):
    settings = cfg.settings(CELL)
    model, _ = evaluate.load_model(run_dir / "checkpoint-best.pt", "cpu")
    x, y, index = evaluate.evaluated_examples(settings)
    return settings, model, x, y, index


def test_files_follow_the_contract(trained):
    cfg, run_dir, res = trained
    settings, model, x, y, index = model_and_examples(cfg, run_dir)
    js = json.loads((run_dir / "perception.json").read_text())
    assert js["cell"] == CELL.id and js["method"] == "pgd_at" and js["rpat"] is False and js["seed"] == 3
    assert js["checkpoint"] == "best" and js["examples"] == evaluate.examples_record(settings, index)
    for key in ("noise", "pgd20"):
        assert set(js[key]) == {"clean_acc", "perturbed_acc", "mse"}
        assert set(js[key]["mse"]) == {"all", "success", "failure", "n", "n_success", "n_failure"}
        assert js[key]["mse"]["n"] == 24 == js[key]["mse"]["n_success"] + js[key]["mse"]["n_failure"]
    assert set(js["path"]) == {"alphas", "per_alpha", "nonlinearity", "mid_clean", "mid_adv", "n"}
    assert js["path"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # eval.perception_alphas: 5
    # torch.lerp is exact at both ends: the path starts at z(x) and ends at z(x') exactly
    assert js["path"]["per_alpha"][0] == 0.0 and js["path"]["per_alpha"][-1] == 0.0

    with np.load(run_dir / "perception.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {"index", "mse_noise", "defended_noise", "mse_pgd20", "defended_pgd20", "path_mse",
                           "nonlinearity"}
    assert np.array_equal(arrays["index"], index.numpy()) and arrays["index"].dtype == np.int64
    assert arrays["path_mse"].shape == (5, 24) and arrays["nonlinearity"].shape == (24,)
    assert arrays["defended_pgd20"].dtype == bool
    assert np.allclose(arrays["nonlinearity"], arrays["path_mse"].mean(axis=0), rtol=1e-12)
    assert js["path"]["nonlinearity"] == pytest.approx(arrays["nonlinearity"].mean(), rel=1e-12)
    assert js["pgd20"]["perturbed_acc"] == pytest.approx(100 * arrays["defended_pgd20"].mean())
    # float32 per example, their mean in float64 (numpy's float32 mean is only float32-exact)
    assert js["pgd20"]["mse"]["all"] == pytest.approx(arrays["mse_pgd20"].mean(dtype=np.float64), rel=1e-9)
    clean = accuracy.correct(model, x, y)
    assert js["noise"]["clean_acc"] == js["pgd20"]["clean_acc"] == pytest.approx(100 * clean.double().mean().item())
    assert res["mlflow_metrics"]["perception_nonlinearity"] == js["path"]["nonlinearity"]


def test_perturbations_come_from_the_block_generators(trained):
    """x' is PGD-20 (eval.pgd_steps) from block_generator(seed, "pgd20", 0): the example evaluation attacks;
    the noise is uniform in the eps-ball from the "noise" generator."""
    cfg, run_dir, _ = trained
    settings, model, x, y, _ = model_and_examples(cfg, run_dir)
    with np.load(run_dir / "perception.npz") as z:
        arrays = {k: z[k] for k in z.files}
    x_adv = accuracy.pgd_examples(model, x, y, settings.threat, 3, generator=blocks.block_generator(3, "pgd20", 0))
    x_noise = attacks.uniform_noise(x, 0.2, blocks.block_generator(3, "noise", 0))
    with torch.no_grad():
        z, z_adv, z_noise = model(x), model(x_adv), model(x_noise)
    assert np.array_equal(arrays["defended_pgd20"], (z_adv.argmax(1) == y).numpy())
    assert np.allclose(arrays["mse_pgd20"], perception.logit_mse(z, z_adv).numpy(), rtol=1e-5, atol=1e-9)
    assert np.allclose(arrays["mse_noise"], perception.logit_mse(z, z_noise).numpy(), rtol=1e-5, atol=1e-9)
    assert (x_noise - x).abs().max() <= 0.2 + 1e-7 and not torch.equal(x_noise, x)


def test_blocks_make_the_perturbation_independent_of_how_examples_are_batched(trained, monkeypatch):
    """With blocks of 10, the 24 examples' x' is block 0, 1, 2 each from its own generator."""
    cfg, run_dir, _ = trained
    settings, model, x, y, _ = model_and_examples(cfg, run_dir)
    settings = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, block_size=10))
    got = perceive.perturb(model, x, y, settings, "pgd20")
    for b, r in enumerate([range(0, 10), range(10, 20), range(20, 24)]):
        want = accuracy.pgd_examples(model, x[r.start:r.stop], y[r.start:r.stop], settings.threat, 3,
                                     generator=blocks.block_generator(3, "pgd20", b))
        assert torch.equal(got[r.start:r.stop], want)
    noise = perceive.perturb(model, x, y, settings, "noise")
    assert torch.equal(noise[10:20], attacks.uniform_noise(x[10:20], 0.2, blocks.block_generator(3, "noise", 1)))


def test_summary_metrics_go_to_the_cells_mlflow_run(trained):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, res = trained
    run_id = json.loads((run_dir / "train.json").read_text())["mlflow_run_id"]
    run = MlflowClient(tracking_uri=cfg.tracking["uri"]).get_run(run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("perception_")}
    assert logged == pytest.approx(res["mlflow_metrics"])
    assert {"perception_nonlinearity", "perception_mse_noise_all", "perception_mse_pgd20_failure"} <= set(logged)


def test_another_cells_record_is_refused_before_work(trained, tmp_path):
    cfg, run_dir, _ = trained
    other = config.Cell("digits", "cnn", "linf", "pgd_at", True, 3)
    with pytest.raises(evaluate.EvaluationError, match="belongs to cell"):
        perceive.perceive(cfg.settings(other), run_dir / "train.json", tmp_path / "p.json", tracking=cfg.tracking)
    with pytest.raises(UserError, match="has not been trained"):
        perceive.perceive(cfg.settings(other), tmp_path / "train.json", tmp_path / "p.json", tracking=cfg.tracking)
    assert not (tmp_path / "p.json").exists()


def test_cli_writes_both_files(trained, tmp_path, capsys):
    cfg, run_dir, res = trained
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({**RAW, "results_dir": str(tmp_path), "tracking": {"enabled": False}}))
    out = tmp_path / "out" / "perception.json"
    rc = cli.main(["perceive", "--config", str(cfg_path), "--cell", CELL.id, "--record", str(run_dir / "train.json"),
                   "--out", str(out), "--threads", "1"])
    assert rc == 0 and out.with_suffix(".npz").is_file()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["perception_nonlinearity"] == pytest.approx(res["mlflow_metrics"]["perception_nonlinearity"])
    assert cli.main(["perceive", "--config", str(cfg_path), "--cell", CELL.id, "--out", str(tmp_path / "p.txt"),
                     "--record", str(run_dir / "train.json")]) == 2


def test_nan_is_written_as_null_and_left_out_of_mlflow():
    assert perceive.nan_to_none({"a": [1.0, math.nan], "b": {"c": math.nan}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"}
    mse = {"all": 1.0, "success": math.nan, "failure": 1.0, "n": 2, "n_success": 0, "n_failure": 2}
    summary = {"noise": {"perturbed_acc": 0.0, "mse": mse}, "pgd20": {"perturbed_acc": 0.0, "mse": mse},
               "path": {"nonlinearity": 0.5, "mid_clean": 0.1, "mid_adv": 0.2}}
    metrics = perceive.tracked_metrics(summary)
    assert "perception_mse_noise_success" not in metrics and metrics["perception_mse_noise_failure"] == 1.0
    assert metrics["perception_nonlinearity"] == 0.5 and len(metrics) == 9
