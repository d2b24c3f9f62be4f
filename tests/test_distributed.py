"""Data-parallel training (rpat/distributed.py, rpat/launch.py): N processes train what one process trains.

Real processes over gloo, launched as users launch them (``rpat train --processes N``), in float64 so that
"equal" means equal to float64 rounding: every step's loss parts, the final weights, BatchNorm buffers and the
weight average, for PGD-AT+RPAT and TRADES+RPAT with EMA and for ReBAT+RPAT (RPAT++, whose teacher is the
average); the same after SIGTERM on one rank mid-epoch and a resume with the other number of processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rpat import distributed, processes
from rpat.distributed import Shard
from rpat.processes import World

TOL = 1e-11  # float64 rounding, accumulated over a few steps of a small CNN

BASE = {
    "experiment": "ddp-test",
    "tracking": {"enabled": False},
    # 256 training digits in batches of 64: 4 steps per epoch, each split 32/32 over two processes
    "data": {"batch_size": 64, "train_subset": 256, "val_size": 100},
    "train": {"epochs": 2, "precision": "float64", "step_log": True, "val_attack_steps": 2,
              "weight_average": {"kind": "ema", "decay": 0.9}},
    "methods": {"rebat": {"warmup_epoch": 1, "decay": 0.9, "teacher_bn_first_epoch": "train"}},
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at", "trades"],
              "rpat": [True], "seed": [0]},
             {"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["rebat"], "rpat": [True],
              "seed": [0], "set": {"train": {"weight_average": {"kind": "none"}, "awp": {"enabled": False}}}},
             # two augmented views per image (a view pair stays on one process) and SWA from the first epoch
             {"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["consistency"], "rpat": [True],
              "seed": [0], "set": {"data": {"augment": "crop_flip"},
                                   "train": {"weight_average": {"kind": "swa", "swa_start": 1}}}}],
}
AWP = {"awp": {"enabled": True, "gamma": 0.005, "warmup": 0}}


def write_config(tmp: Path, extra: dict | None = None) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["results_dir"] = str(tmp / "results")
    for section, values in (extra or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rpat_train(config: Path, cell: str, out: Path, processes: int, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rpat", "train", "--config", str(config), "--cell", cell, "--out", str(out),
           "--processes", str(processes), "--threads", str(processes)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(config: Path, cell: str, out: Path, processes: int) -> str:
    p = rpat_train(config, cell, out, processes)
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output
    return output


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    return torch.load(out / "state" / "last.pt", map_location="cpu", weights_only=False)


def assert_same_training(a: Path, b: Path) -> None:
    """Every step's loss parts, the weights, BatchNorm buffers and the weight average of runs ``a`` and ``b``."""
    sa, sb = steps(a), steps(b)
    assert [(s["epoch"], s["step"]) for s in sa] == [(s["epoch"], s["step"]) for s in sb]
    assert len(sa) == 8
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x.keys() - {"time"}:
            assert x[k] == pytest.approx(y[k], rel=TOL, abs=TOL), (x["epoch"], x["step"], k)
    ta, tb = final_state(a), final_state(b)
    for part in ("model", "average"):
        assert (ta[part] is None) == (tb[part] is None)
        for key, value in (ta[part] or {}).items():
            other = tb[part][key]
            if value.is_floating_point():
                assert torch.allclose(value, other, rtol=TOL, atol=TOL), (part, key, (value - other).abs().max())
            else:
                assert torch.equal(value, other), (part, key)
    # the BatchNorm running statistics moved (the comparison above is not of untouched buffers)
    assert not torch.allclose(ta["model"]["net.1.running_var"], torch.ones_like(ta["model"]["net.1.running_var"]))
    ha, hb = (json.loads((d / "train.json").read_text())["history"] for d in (a, b))
    assert [(h["val_clean"], h["val_pgd"]) for h in ha] == [(h["val_clean"], h["val_pgd"]) for h in hb]


CELLS = ["digits/cnn/linf/pgd_at+rpat/seed0", "digits/cnn/linf/trades+rpat/seed0", "digits/cnn/linf/rebat+rpat/seed0",
         "digits/cnn/linf/consistency+rpat/seed0"]


@pytest.mark.parametrize("cell", CELLS, ids=["pgd_at+rpat", "trades+rpat", "rebat+rpat", "consistency+rpat"])
def test_two_processes_train_what_one_trains(tmp_path, cell):
    config = write_config(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run(config, cell, one, 1)
    output = run(config, cell, two, 2)
    assert output.count("epoch 2/2") == 1  # only rank 0 reports
    assert_same_training(one, two)
    record = json.loads((two / "train.json").read_text())
    assert record["history"][-1]["loss_total"] == pytest.approx(
        json.loads((one / "train.json").read_text())["history"][-1]["loss_total"], rel=1e-6)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_only_rank_0_logs_to_mlflow(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path, {"tracking": {"enabled": True, "uri": uri, "log_model": False},
                                     "train": {**BASE["train"], "epochs": 1}})
    run(config, CELLS[0], tmp_path / "run", 2)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["processes"] == "2" and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss_total")
    assert len(history) == 1
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    assert history[0].value == pytest.approx(record["history"][0]["loss_total"])


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "steps.jsonl").exists() and len((out / "steps.jsonl").read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} steps logged in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_sigterm_mid_epoch_then_resume_with_the_other_number_of_processes(tmp_path, first, then):
    """SIGTERM to one rank (the last) mid-epoch: every rank stops at the same step, one state is saved, the job
    exits 75; resumed with the other number of processes, it ends where an uninterrupted run ends (with AWP)."""
    config = write_config(tmp_path, {"train": {**BASE["train"], **AWP}})
    cell = CELLS[1]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(config, cell, straight, 1)
    p = rpat_train(config, cell, stopped, first)
    _wait_for_steps(stopped, 2, p)
    ranks = _children(p.pid) if first > 1 else [p.pid]
    os.kill(ranks[-1], signal.SIGTERM)
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 75, output
    saved = final_state(stopped)
    assert saved["partial"] is not None and 0 < saved["partial"]["step"] < 4, saved["partial"]
    assert not (stopped / "train.json").exists()
    output = run(config, cell, stopped, then)
    assert "resuming at epoch 1, step" in output
    assert_same_training(straight, stopped)


def test_bad_splits_are_refused_before_any_work(tmp_path):
    config = write_config(tmp_path)
    for processes, expect in ((3, "data.batch_size=64 is not divisible by resources.processes=3"),
                              (128, "resources.processes=128 exceeds data.batch_size=64")):
        out = tmp_path / f"p{processes}"
        p = rpat_train(config, CELLS[0], out, processes)
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 2 and expect in output, output
        assert output.strip().count("\n") == 0  # one line
        assert not out.exists()
    # a last batch of 1 example cannot be split over 2 processes: found once the data is loaded, before training
    config = write_config(tmp_path, {"data": {**BASE["data"], "train_subset": 257}})
    p = rpat_train(config, CELLS[0], tmp_path / "last", 2)
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 2, output
    assert "the last batch of each epoch holds 1 of 257 training examples, fewer than the 2 processes" in output
    assert output.count("error:") == 1
    assert not (tmp_path / "last" / "state").exists()


def test_a_config_with_an_impossible_split_fails_at_load(tmp_path):
    from rpat import config as C
    from rpat.errors import ConfigError

    path = write_config(tmp_path, {"resources": {"default": {"processes": 3, "nodes": 2}}})
    with pytest.raises(ConfigError) as e:
        C.load(path)
    assert "resources.processes=3 is not a multiple of resources.nodes=2" in str(e.value)
    assert "data.batch_size=64 is not divisible by resources.processes=3" in str(e.value)


@pytest.mark.slow
def test_a_dying_rank_stops_the_job_with_one_line_and_keeps_the_last_state(tmp_path):
    config = write_config(tmp_path, {"train": {**BASE["train"], "epochs": 4}})
    out = tmp_path / "run"
    p = rpat_train(config, CELLS[0], out, 2)
    _wait_for_steps(out, 5, p)  # into epoch 2: the state of epoch 1 is saved
    os.kill(_children(p.pid)[1], signal.SIGKILL)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 1, output
    assert "rpat train: error: rank 1 of 2 was killed by SIGKILL; stopped the other ranks" in output
    assert not (out / "train.json").exists()
    assert final_state(out)["epoch"] >= 1
    assert not list(out.rglob("*.tmp*"))
    resumed = run(config, CELLS[0], out, 1)
    assert "resuming at epoch" in resumed and (out / "train.json").exists()


# --- the pieces, without processes


def test_shards_split_every_view_block_alike():
    w = [World(r, 2) for r in range(2)]
    assert Shard.of(8, 1, w[0]).rows.tolist() == [0, 1, 2, 3] and Shard.of(8, 1, w[1]).rows.tolist() == [4, 5, 6, 7]
    # two views (Consistency-AT): rows i and i + 4 are the same image; a pair stays on one rank
    assert Shard.of(8, 2, w[0]).rows.tolist() == [0, 1, 4, 5] and Shard.of(8, 2, w[1]).rows.tolist() == [2, 3, 6, 7]
    odd = [Shard.of(5, 1, World(r, 2)) for r in range(2)]
    assert [s.rows.tolist() for s in odd] == [[0, 1], [2, 3, 4]]
    assert [s.weight for s in odd] == [0.4, 0.6] and [s.loss_scale for s in odd] == [0.8, 1.2]


def test_a_draw_inside_a_step_is_the_global_draw_cut_to_the_rank():
    shard = Shard.of(6, 1, World(1, 3))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = torch.rand((6, 2), generator=g1)
    with distributed.step(shard):
        mine = distributed.draw(torch.rand, (2, 2), generator=g2)
        with pytest.raises(RuntimeError, match="draws must be shaped like the step's batch"):
            distributed.draw(torch.rand, (3, 2), generator=g2)
    assert torch.equal(mine, full[2:4])
    assert torch.equal(distributed.draw(torch.rand, (2,), generator=torch.Generator().manual_seed(3)),
                       torch.rand(2, generator=torch.Generator().manual_seed(3)))


def test_the_world_comes_from_torchrun_or_slurm():
    assert processes.world_from_env({}) == World()
    assert processes.world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == World(3, 8, 1)
    # a Slurm job step's tasks are ranks only under rpat's srun launch (not any srun -n1 wrapper)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert processes.world_from_env(slurm) == World()
    assert processes.world_from_env({**slurm, processes.SLURM_RANKS: "1"}) == World(5, 8, 1)


def test_launch_uses_srun_only_in_a_batch_step_with_the_tasks():
    from rpat.launch import in_slurm_batch

    assert not in_slurm_batch(2, {})
    assert in_slurm_batch(2, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    assert not in_slurm_batch(2, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert not in_slurm_batch(2, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
