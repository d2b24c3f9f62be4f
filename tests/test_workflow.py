"""The Snakemake workflow: planning (dry runs), lint, config errors, and a tiny real end-to-end run."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import browser
from tiny import tiny_config, tiny_grid

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# The tiny grid with AutoAttack (the summary has AA, Mean and NRR) on 24 test examples.
TINY = tiny_config(experiment="tiny-e2e", eval={"n_examples": 24, "autoattack": {"enabled": True}})


def snakemake(*args, cwd=ROOT, timeout=900):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_dry_run_plans_the_demo_grid(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    out = snakemake("-n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert job_counts(out.stdout) == {"train": 4, "evaluate": 4, "perceive": 4, "report": 1, "all": 1}


def test_dry_run_plans_the_paper_grid_quickly_without_data(tmp_path):
    t0 = time.perf_counter()
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "paper.yaml"), cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    # 3 datasets x 4 baselines x 2 + PreActResNet-18 (2 datasets x 2 norms x 2) + WRN-34-10 x 2; each data
    # set on disk is prepared once (downloaded if allowed, laid out, decoded into the cache) before training;
    # each cell's best and last checkpoints are evaluated (eval.checkpoints)
    assert job_counts(out.stdout) == {"prepare_data": 3, "train": 34, "evaluate": 68, "perceive": 34, "report": 1,
                                      "all": 1}
    print(f"planning the paper grid took {seconds:.1f} s")


@pytest.mark.parametrize("name", ["perception", "perception-cifar10"])
def test_dry_run_plans_the_perception_study(tmp_path, name):
    """ce, noise and pgd_at: each trained, evaluated and analysed (`rpat perceive`), then the report."""
    out = snakemake("-n", "--configfile", str(ROOT / "config" / f"{name}.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = {"prepare_data": 1} if name.endswith("cifar10") else {}
    assert job_counts(out.stdout) == {**data, "train": 3, "evaluate": 3, "perceive": 3, "report": 1, "all": 1}
    assert "results/perception" in out.stdout


def test_lint_is_clean():
    out = snakemake("--lint")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations" in out.stdout + out.stderr


def test_bad_config_stops_snakemake_with_the_key_and_allowed_values(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["grid"][0]["method"] = ["pgd_at", "fast_at"]
    cfg["threat"]["linf"]["eps"] = -0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = snakemake("-n", "--configfile", str(path), cwd=tmp_path)
    assert out.returncode != 0
    err = out.stdout + out.stderr
    assert "grid[0].method[1]: 'fast_at' is not allowed" in err
    assert "trades" in err and "consistency" in err
    assert "threat.linf.eps" in err
    assert not (tmp_path / "results").exists()


def test_command_line_config_overrides_are_refused(tmp_path):
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), "--config", "experiment=x",
                    cwd=tmp_path)
    assert out.returncode != 0
    assert "--config overrides" in out.stdout + out.stderr


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    out = snakemake("--cores", "2", "--configfile", str(cfg_path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    summary = pd.read_csv(tmp_path / "results" / "tables" / "summary.csv")
    assert len(summary) == 2
    assert sorted(summary.cell) == ["digits/cnn/linf/pgd_at+rpat/seed0", "digits/cnn/linf/pgd_at/seed0"]
    for row in summary.itertuples():
        assert 0 <= row.aa <= row.pgd20 <= row.clean <= 100
        # the CSV holds 4 decimals, so Mean and NRR recomputed from its Clean and AA agree to its rounding
        assert row.mean == pytest.approx((row.clean + row.aa) / 2, abs=1e-4)
        assert row.nrr == pytest.approx(2 * row.clean * row.aa / (row.clean + row.aa) if row.clean + row.aa else 0,
                                        abs=1e-3)
    md = (tmp_path / "results" / "tables" / "summary.md").read_text()
    assert re.search(r"^\| PGD-AT\+RPAT +\|", md, re.M) and re.search(r"^\| Δ +\|", md, re.M)
    assert (tmp_path / "results" / "plots" / "tradeoff.png").stat().st_size > 10_000
    for name in ("perception", "path"):  # the perceive jobs ran and the report drew them
        assert (tmp_path / "results" / "plots" / f"{name}.png").stat().st_size > 20_000
    assert summary.nonlinearity.notna().all() and (summary.nonlinearity >= 0).all()
    # the pair compared on the same examples: the nonlinearity always, accuracies where evaluation kept outcomes
    comparison = pd.read_csv(tmp_path / "results" / "tables" / "comparison.csv")
    outcomes = (tmp_path / "results" / "runs" / summary.cell[0] / "outcomes.npz").exists()
    assert set(comparison.metric) == {"nonlinearity"} | ({"clean", "pgd20", "cw", "aa"} if outcomes else set())
    assert re.search(r"^\| Δ .*\[", md, re.M) and (comparison.n == 24).all()

    run_dir = tmp_path / "results" / "runs" / "digits" / "cnn" / "linf" / "pgd_at+rpat" / "seed0"
    train = json.loads((run_dir / "train.json").read_text())
    assert [h["epoch"] for h in train["history"]] == [1, 2]
    assert {"loss_ce", "loss_rpat", "loss_rpat_weighted", "loss_total", "val_clean", "val_pgd"} <= set(
        train["history"][0])
    perception = json.loads((run_dir / "perception.json").read_text())
    assert perception["path"]["n"] == 24 and len(perception["path"]["per_alpha"]) == 11
    if outcomes:  # the path ends at the very examples evaluation's PGD-20 attacked with (same per-block generators)
        with np.load(run_dir / "perception.npz") as p, np.load(run_dir / "outcomes.npz") as o:
            assert np.array_equal(p["index"], o["index"]) and np.array_equal(p["defended_pgd20"], o["pgd20"])
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["n_examples"] == 24 and ev["eps"] == pytest.approx(0.3)
    assert list(ev["aa_per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"][: len(ev["aa_per_attack"])]
    assert ev["aa"] <= min(ev["aa_per_attack"].values()) + 1e-9

    # MLflow: one run per cell, tagged with its coordinates, with per-epoch metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["cell"] for r in runs) == sorted(summary.cell)
    for r in runs:
        assert {"dataset", "model", "norm", "method", "rpat", "seed"} <= set(r.data.tags)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_pgd")] == [1, 2]
        assert {"test_aa", "test_clean", "perception_nonlinearity"} <= set(r.data.metrics)
        assert r.data.params["train.epochs"] == "2"

    again = snakemake("-n", "--configfile", str(cfg_path), cwd=tmp_path)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    check_html_report(tmp_path, cfg_path, sorted(summary.cell))
    # `rpat status` on the finished grid: every cell done (--watch stops at once: nothing left to change)
    status = subprocess.run([sys.executable, "-m", "rpat", "status", "--config", str(cfg_path), "--watch", "0.1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[-1] == "2 cells: 0 planned, 0 training, 0 evaluating, 2 done, 0 failed"
    for cell in summary.cell:
        assert sum(bool(re.match(rf"{re.escape(cell)} +done +epoch 2/2 ", line)) for line in lines) == 1


def check_html_report(tmp_path, cfg_path, cells):
    """`snakemake --report`: the tables, figures and each cell's training curves with their captions, and the
    pages as headless Chromium draws them."""
    out = snakemake("--configfile", str(cfg_path), "--report", "report.html", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = browser.entries(tmp_path / "report.html")
    results, categories = report["results"], report["categories"]
    curves = [f"results/plots/training/{c}.png" for c in cells]
    assert sorted(categories) == ["Figures", "Tables", "Training curves: digits / cnn"]
    assert sorted(categories["Training curves: digits / cnn"]["linf"]) == sorted(curves)
    assert sorted(categories["Figures"]["perception"]) == ["results/plots/path.png", "results/plots/perception.png"]
    for c in curves:
        assert results[c]["mime_type"] == "image/png" and "Training of one grid cell" in results[c]["caption"]
    assert "<strong>tiny-e2e</strong>" in results["results/tables/summary.html"]["caption"]  # Jinja: the config
    page = browser.decoded(results["results/tables/summary.html"]["data_uri"])
    assert all(f"<td>{c}</td>" in page for c in cells)
    assert "Results of the rpat experiment <strong>tiny-e2e</strong>" in (tmp_path / "report.html").read_text()

    dom = browser.render(tmp_path / "report.html", ["Training curves: digits / cnn", "row:pgd_at+rpat"], tmp_path)
    assert 'class="missing-step"' not in dom
    assert results["results/plots/training/digits/cnn/linf/pgd_at+rpat/seed0.png"]["data_uri"] in dom  # drawn
    dom = browser.render(tmp_path / "report.html", ["Tables", "summary", "row:html"], tmp_path)
    assert 'class="missing-step"' not in dom and "filename=summary.html" in dom


@pytest.mark.slow
def test_killed_snakemake_run_resumes_training_instead_of_restarting(tmp_path):
    """SIGTERM to a running `snakemake` (as a Slurm time limit or Ctrl-C would): the training job saves its
    state; rerunning the same command resumes it and finishes the grid."""
    import signal

    # Six epochs of 4 batches: training is still running when the kill comes.
    cfg = tiny_config(grid=tiny_grid(rpat=[True]), data={"train_subset": 512, "batch_size": 128},
                      train={"epochs": 6})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([*SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--cores", "1", "--configfile",
                             str(cfg_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    state = tmp_path / "results" / "runs" / "digits" / "cnn" / "linf" / "pgd_at+rpat" / "seed0" / "state" / "last.pt"
    deadline = time.time() + 240
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "training never saved a state"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, like a scheduler's kill
    proc.wait(timeout=120)
    log = tmp_path / "results" / "logs" / "train" / "digits" / "cnn" / "linf" / "pgd_at+rpat" / "seed0.log"
    assert not (state.parent.parent / "train.json").exists()

    again = snakemake("--cores", "1", "--rerun-incomplete", "--configfile", str(cfg_path), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming at epoch" in log.read_text()
    train = json.loads((state.parent.parent / "train.json").read_text())
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "results" / "tables" / "summary.csv").exists()


def test_dry_run_plans_the_recipes_and_svhn_grids(tmp_path):
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "recipes.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # PGD-AT and TRADES x RPAT off/on x {plain, ema, awp}; CIFAR-10 prepared once
    assert job_counts(out.stdout) == {"prepare_data": 1, "train": 12, "evaluate": 12, "perceive": 12, "curve": 12,
                                      "report": 1, "all": 1}
    assert "cifar10/preact_resnet18/linf/trades+rpat+awp/seed0/train.json" in out.stdout
    assert "cifar10/preact_resnet18/linf/trades+rpat+awp/seed0/curve.json" in out.stdout
    assert "cifar10/preact_resnet18/linf/pgd_at/seed0/train.json" in out.stdout
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "svhn.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert job_counts(out.stdout) == {"prepare_data": 1, "train": 8, "evaluate": 8, "perceive": 8, "report": 1,
                                      "all": 1}
    out = snakemake("-n", "--configfile", str(ROOT / "config" / "recipes-digits.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert job_counts(out.stdout) == {"train": 12, "evaluate": 12, "perceive": 12, "curve": 12, "report": 1,
                                      "all": 1}  # digits: nothing to prepare


@pytest.mark.slow
def test_recipes_digits_grid_end_to_end(tmp_path):
    """config/recipes-digits.yaml through the real workflow, its TRADES half (6 cells: a job spends most of its
    ~10 s starting up; the PGD-AT half adds nothing new), MLflow off (test_tiny_grid_end_to_end covers it): the
    recipe is a table column, and every cell's robustness curve (Linf PGD-20 and AutoAttack, L1 AutoAttack) is
    measured and drawn."""
    overlay = yaml.safe_load((ROOT / "config" / "recipes-digits.yaml").read_text())["grid"]
    overlay[0]["method"] = ["trades"]
    (tmp_path / "half.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}, "grid": overlay}))
    t0 = time.perf_counter()
    out = snakemake("--cores", "2", "--configfile", str(ROOT / "config" / "recipes-digits.yaml"),
                    str(tmp_path / "half.yaml"), cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = tmp_path / "results" / "recipes_digits"
    summary = pd.read_csv(results / "tables" / "summary.csv")
    assert len(summary) == 6 and sorted(set(summary.recipe)) == ["awp", "ema", "plain"]
    assert "digits/cnn/linf/trades+rpat+ema/seed0" in set(summary.cell)
    assert (summary.clean > 80).all(), summary[["cell", "clean"]]  # the recipe trains real models, not chance
    md = (results / "tables" / "summary.md").read_text()
    assert re.search(r"^\| Method +\| Recipe +\|", md, re.M)
    assert re.search(r"^\| TRADES\+RPAT +\| awp +\|", md, re.M) and re.search(r"^\| Δ +\| ema +\|", md, re.M)
    train = json.loads((results / "runs" / "digits/cnn/linf/trades+awp/seed0" / "train.json").read_text())
    assert train["settings"]["train"]["awp"]["enabled"] is True and train["recipe"] == "awp"
    # the robustness curve: every cell's points, accuracy not rising with eps, AutoAttack below PGD-20
    for cell in summary.cell:
        c = json.loads((results / "runs" / cell / "curve.json").read_text())
        acc = {(p["norm"], p["eps"], p["attack"]): p["accuracy"] for p in c["points"]}
        assert sorted(acc) == [("l1", 6.0, "aa"), ("linf", 0.1, "pgd20"), ("linf", 0.2, "aa"),
                               ("linf", 0.2, "pgd20"), ("linf", 0.3, "pgd20")]
        pgd = [c["clean"]] + [acc[("linf", e, "pgd20")] for e in (0.1, 0.2, 0.3)]
        one = 100.0 / c["n_examples"]  # PGD from a random start may gain an example at a larger radius
        assert all(b <= a + one for a, b in zip(pgd, pgd[1:])), (cell, pgd)
        assert acc[("linf", 0.2, "aa")] <= acc[("linf", 0.2, "pgd20")] and acc[("l1", 6.0, "aa")] <= c["clean"]
        ev = json.loads((results / "runs" / cell / "eval.json").read_text())
        assert acc[("linf", 0.2, "pgd20")] == ev["pgd20"] and c["clean"] == ev["clean"]  # the same examples
    assert (results / "plots" / "curves.png").stat().st_size > 0 and (results / "plots" / "curves.pdf").exists()
    print(f"the recipes digits grid took {seconds:.0f} s")
