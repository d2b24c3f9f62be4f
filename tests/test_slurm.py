"""The Slurm profile on a real one-node Slurm cluster (scripts/slurm-local.sh start).

A tiny grid runs through `snakemake --profile profiles/slurm` with every job asking for a GPU: the cluster
has counted GPUs (gres gpu:2) so GPU requests schedule on a CPU-only machine. The test checks the results,
that training and evaluation really went through sbatch with the resources from the config, and what
slurmctld allocated. Without a cluster it skips, except under CI=true, where it fails: CI must prove it.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slurm

TINY = tiny_config(
    experiment="tiny-slurm",
    train={"epochs": 1},
    eval={"autoattack": {"enabled": True}},
    # Every job asks for a GPU, so the submissions must carry a GPU request the cluster can satisfy.
    resources={"default": {"gpu": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10}},
)
CELLS = ["digits/cnn/linf/pgd_at/seed0", "digits/cnn/linf/pgd_at+rpat/seed0"]


def cluster_problem() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    for tool in ("sbatch", "squeue", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            return f"'{tool}' not on PATH (start a cluster with: bash scripts/slurm-local.sh start)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Slurm does not answer: {err}"
    if "is UP" not in ping.stdout:
        said = [ln for ln in (ping.stdout + ping.stderr).splitlines() if ln.strip() and "*" not in ln]
        return f"slurmctld is not up: {'; '.join(said) or 'no answer'} (bash scripts/slurm-local.sh start)"
    usable = {"idle", "mixed", "allocated", "completing"}
    if not usable & {s.strip() for s in states.stdout.split()}:
        return f"no usable node (sinfo states: {states.stdout.split() or states.stderr.strip()})"
    return None


def require_cluster():
    problem = cluster_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the local Slurm cluster is not usable: {problem}")
        pytest.skip(f"no local Slurm cluster: {problem}")


def sbatch_calls(output: str) -> dict[str, list[str]]:
    """The plugin's `sbatch call: ...` lines (printed with --verbose), by rule."""
    calls: dict[str, list[str]] = {}
    for line in output.splitlines():
        if "sbatch call:" in line:
            call = line.split("sbatch call:", 1)[1].split(" --wrap=", 1)[0]
            rule = re.search(r"--comment '?rule_(\w+?)_wildcards", call)
            calls.setdefault(rule[1] if rule else "?", []).append(call)
    return calls


def scontrol_job(jobid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, timeout=20)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


@pytest.mark.slow
def test_tiny_grid_runs_through_slurm_with_gpu_requests(tmp_path):
    require_cluster()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
         "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile", "none",
         "--configfile", str(cfg),
         # a test's jobs take seconds: check their status early and often (3 x 2 s << MinJobAge 300 s)
         "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--retries", "0",
         "--verbose"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    print(f"slurm run took {seconds:.0f} s")

    # The results.
    summary = pd.read_csv(tmp_path / "results" / "tables" / "summary.csv")
    assert sorted(summary.cell) == sorted(CELLS)
    for row in summary.itertuples():
        assert 0 <= row.aa <= row.clean <= 100

    # Training, evaluation and the perception analysis went through sbatch, carrying the config's resources,
    # the GPU as --gpus and the early-warning signal for training and evaluation; the report ran on the submit host.
    calls = sbatch_calls(log)
    assert sorted(calls) == ["evaluate", "perceive", "train"], calls
    assert all(len(calls[rule]) == 2 for rule in calls), calls
    for rule, rule_calls in calls.items():
        for call in rule_calls:
            flags = call.split()
            assert "--gpus=1" in flags, call
            assert "--cpus-per-task=1" in flags, call
            assert flags[flags.index("--mem") + 1] == "1000", call
            assert flags[flags.index("-t") + 1] == "10", call
            # the resumable jobs get the early warning; the perception analysis reruns from scratch
            assert ("--signal=B:USR1@300" in flags) == (rule in ("train", "evaluate")), call
            assert "--ntasks=1" not in flags  # GPU jobs get no implicit task geometry
    print("sbatch (train):", calls["train"][0])

    # One Slurm log per job (kept by the profile), named after the Slurm job id.
    logdir = tmp_path / ".snakemake" / "slurm_logs"
    jobids = {}
    for rule in ("train", "evaluate"):
        logs = sorted((logdir / f"rule_{rule}").glob("*/*.log"))
        assert len(logs) == 2, sorted(logdir.rglob("*"))
        jobids[rule] = [p.stem for p in logs]
        for p in logs:
            assert p.stem.isdigit()
            text = p.read_text()
            assert "--executor slurm-jobstep" in text, text[-2000:]
            # the allocation: Slurm gave the job one GPU (the jobstep prints its environment with --verbose)
            assert "'SLURM_GPUS_ON_NODE': '1'" in text, text[-2000:]
            assert re.search(r"'SLURM_JOB_GPUS': '\d'", text), text[-2000:]

    # What slurmctld allocated (jobs stay visible for MinJobAge = 300 s after they end).
    job = scontrol_job(jobids["train"][0])
    if job:  # a real cluster with a short MinJobAge may have forgotten the job already
        assert job["JobState"] == "COMPLETED", job
        assert job["TimeLimit"] == "00:10:00", job
        assert job["TresPerJob"] == "gres:gpu:1", job
        assert {"cpu=1", "mem=1000M"} <= set(job["TRES"].split(",")), job
        assert job["Partition"], job


@pytest.mark.slow
def test_one_cell_trains_as_a_two_task_slurm_job(tmp_path):
    """resources.processes: 2 makes the training job one Slurm job with two tasks, whose ranks srun starts
    (rpat/launch.py) and which train the cell together (tests/test_distributed.py: as one process would)."""
    require_cluster()
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(
        experiment="ddp-slurm", train={"epochs": 2}, data={"batch_size": 64, "train_subset": 256, "val_size": 100},
        resources={"default": {"gpu": 0, "cpus": 1, "mem_mb": 1000, "runtime": 10, "processes": 2}})))
    cell = CELLS[1]
    target = f"results/runs/{cell}/train.json"
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
         "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile", "none", "--configfile", str(cfg),
         "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--retries", "0", "--verbose",
         target],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    calls = sbatch_calls(log)
    assert sorted(calls) == ["train"] and len(calls["train"]) == 1, calls
    flags = calls["train"][0].split()
    assert "--ntasks=2" in flags and "--cpus-per-task=1" in flags, flags
    assert not any(f.startswith("--gpus") for f in flags), flags
    train_log = (tmp_path / "results" / "logs" / "train" / f"{cell}.log").read_text()
    assert f"[rpat] {cell}: 2 processes (gloo), 32 examples of each batch per process" in train_log, train_log
    assert train_log.count("epoch 2/2") == 1, train_log  # rank 0 reports, once
    record = yaml.safe_load((tmp_path / target).read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["history"][-1]["val_clean"] > record["history"][0]["val_clean"] - 20
    jobid = sorted((tmp_path / ".snakemake" / "slurm_logs" / "rule_train").glob("*/*.log"))[0].stem
    job = scontrol_job(jobid)
    if job:  # what slurmctld allocated: two tasks of one CPU each
        assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2", job
