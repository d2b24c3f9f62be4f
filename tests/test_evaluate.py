"""Block-wise evaluation: blocks and shards, batch-size-free randomness, saved progress and resume (in-process
signals here, killed processes in test_evaluate_kills.py), CUDA out-of-memory halving, shard merging,
per-example outcomes, several checkpoints, refused inputs, and the workflow's evaluation jobs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from evalcell import NO_AA, cell_copy, cfg_of, outcomes_of, train_cell
from tiny import tiny_config

from rpat import accuracy, blocks, cli, config, models, train
from rpat.jobs import evaluate
from rpat.cells import CellFiles
from rpat.evaluation import engine, measurements, results
from rpat.evaluation.measurements import Measurement, Outcome
from rpat.files import ResultFileError
from rpat.preemption import Preempted
from rpat.settings import Threat

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_cell(tmp_path_factory.mktemp("trained"))


# --- blocks and randomness ---------------------------------------------------------------------------------------

def test_blocks_cover_the_examples_and_shards_split_them_disjointly():
    assert blocks.block_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert blocks.shard_blocks(5, 2, 0) == [0, 2, 4] and blocks.shard_blocks(5, 2, 1) == [1, 3]
    assert blocks.shard_blocks(3, 4, 3) == []  # more shards than blocks: an empty shard
    for n_shards in range(1, 7):
        got = sorted(b for i in range(n_shards) for b in blocks.shard_blocks(5, n_shards, i))
        assert got == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shard 2 is not in 0..1"):
        blocks.shard_blocks(5, 2, 2)


def test_a_blocks_pgd_start_is_the_same_for_every_batch_size():
    """The start drawn for the whole block and sliced equals the one-batch PGD's, so PGD examples (here exactly,
    on the CPU) do not depend on how the block is batched."""
    torch.manual_seed(0)
    model = models.build("cnn", num_classes=10, in_channels=1, image_size=8).eval()
    x, y = torch.rand(13, 1, 8, 8), torch.randint(0, 10, (13,))
    threat = Threat("linf", 0.2, 0.05, 5)
    whole = accuracy.pgd_examples(model, x, y, threat, 10, generator=blocks.block_generator(0, "pgd20", 3))
    start = accuracy.pgd_start(x, threat, blocks.block_generator(0, "pgd20", 3))
    for bs in (1, 4, 13):
        sliced = torch.cat([accuracy.pgd_examples(model, xs, ys, threat, 10, start=s)
                            for xs, ys, s in zip(x.split(bs), y.split(bs), start.split(bs))])
        assert torch.equal(sliced, whole)
    other = accuracy.pgd_examples(model, x, y, threat, 10, generator=blocks.block_generator(0, "pgd20", 4))
    assert not torch.equal(other, whole)  # another block draws another start


# --- per-example outcomes -----------------------------------------------------------------------------------------

def test_outcomes_file_round_trip_and_a_truncated_one_names_itself(tmp_path):
    from rpat.evaluation.results import write_outcomes

    path = tmp_path / "outcomes.npz"
    write_outcomes(path, {"index": np.array([3, 7, 9]), "clean": np.array([True, False, True])})
    got = results.read_outcomes(path)
    assert got["index"].dtype == np.int64 and got["index"].tolist() == [3, 7, 9]
    assert got["clean"].dtype == bool and got["clean"].tolist() == [True, False, True]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ResultFileError, match="outcomes.npz cannot be read"):
        results.read_outcomes(path)
    assert CellFiles.outcomes_beside(tmp_path / "eval-last.json") == tmp_path / "outcomes-last.npz"


def test_eval_json_and_outcomes_for_best_and_last(trained, tmp_path):
    cfg, run_dir = cell_copy(trained, tmp_path, checkpoints=["best", "last"], **NO_AA)
    res = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    best, last = (json.loads((run_dir / n).read_text()) for n in ("eval.json", "eval-last.json"))
    assert res == best and best["checkpoint"] == "best" and last["checkpoint"] == "last"
    record = json.loads((run_dir / "train.json").read_text())
    assert last["checkpoint_epoch"] == 4 and best["checkpoint_epoch"] == record["selection"]["best_epoch"]
    assert best["outcomes"] == "outcomes.npz" and last["outcomes"] == "outcomes-last.npz"
    assert best["aa_package"].startswith("pyautoattack ") and best["aa"] is None
    out = results.read_outcomes(run_dir / "outcomes.npz")
    assert sorted(out) == ["clean", "cw", "index", "pgd20"]
    assert np.all(np.diff(out["index"]) > 0) and best["examples"]["n"] == len(out["index"]) == 32
    for key in ("clean", "pgd20", "cw"):
        assert best[key] == 100.0 * out[key].sum() / 32
    assert best["mlflow_metrics"]["test_clean"] == best["clean"]
    assert last["mlflow_metrics"]["test_last_clean"] == last["clean"] and "test_clean" not in last["mlflow_metrics"]
    assert not (run_dir / "eval-state").exists()  # progress is removed once the results are written


# --- resume after a signal (in-process; killed processes: test_evaluate_kills.py) ------------------------------

def test_signal_saves_progress_and_the_rerun_resumes_to_the_same_outcomes(trained, tmp_path, monkeypatch):
    cfg, run_dir = cell_copy(trained, tmp_path / "straight", **NO_AA)
    evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    expected = outcomes_of(run_dir)

    calls = []

    def pgd20_then_sigterm(ctx):
        calls.append(ctx.block)
        if len(calls) == 2:  # as a scheduler would, between two blocks' work
            os.kill(os.getpid(), signal.SIGTERM)
        return measurements.pgd20(ctx)

    cfg, run_dir = cell_copy(trained, tmp_path / "stopped", **NO_AA)
    monkeypatch.setitem(measurements.MEASUREMENTS, "pgd20", Measurement("pgd20", "PGD-20", "", pgd20_then_sigterm))
    with pytest.raises(Preempted, match="signal SIGTERM after pgd20 on block 1"):
        evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    state = torch.load(run_dir / "eval-state" / "best.pt", weights_only=True)
    assert sorted(state["blocks"]["clean"]) == [0, 1, 2, 3] and sorted(state["blocks"]["pgd20"]) == [0, 1]
    assert not (run_dir / "eval.json").exists()

    res = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    assert calls == [0, 1, 2, 3]  # blocks 0 and 1 were not measured again
    assert outcomes_of(run_dir) == expected and res["sessions"] == 2


def test_progress_of_other_settings_is_ignored(trained, tmp_path, capsys):
    cfg, run_dir = cell_copy(trained, tmp_path, **NO_AA)
    evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    expected = outcomes_of(run_dir)
    state = run_dir / "eval-state" / "best.pt"
    state.parent.mkdir()
    torch.save({"format": "rpat-eval-state-v1", "key": {"eval_fingerprint": "other"}, "blocks": {}}, state)
    res = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    assert "saved for other settings, checkpoint or shard; starting over" in capsys.readouterr().err
    assert outcomes_of(run_dir) == expected and res["sessions"] == 1


# --- CUDA out of memory -------------------------------------------------------------------------------------------

class OutOfMemoryAbove(torch.nn.Module):
    """A model that raises CUDA's out-of-memory error for batches larger than ``limit`` (as a GPU would)."""

    def __init__(self, model, limit: int):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (a batch of {x.shape[0]} > {self.limit})")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_outcomes(trained, tmp_path, monkeypatch, capsys):
    cfg, run_dir = cell_copy(trained, tmp_path / "fits", **NO_AA)
    evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    expected = outcomes_of(run_dir)

    real = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda p, d: (lambda m, c: (OutOfMemoryAbove(m, 3), c))(*real(p, d)))
    cfg, run_dir = cell_copy(trained, tmp_path / "oom", **NO_AA)
    res = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    assert outcomes_of(run_dir) == expected
    # a block of 8 in one batch of 8 (eval.batch_size 500) fails, then in batches of 4; 2 fit, and are kept
    assert res["batch_halvings"] == [{"measurement": "clean", "block": 0, "from": 500, "to": 4},
                                     {"measurement": "clean", "block": 0, "from": 4, "to": 2}]
    assert res["batch_size"] == 2
    assert "CUDA out of memory measuring clean on block 0 with batches of 4: retrying with batches of 2" in \
        capsys.readouterr().err

    monkeypatch.setattr(evaluate, "load_model", lambda p, d: (lambda m, c: (OutOfMemoryAbove(m, 0), c))(*real(p, d)))
    cfg, run_dir = cell_copy(trained, tmp_path / "never", **NO_AA)
    with pytest.raises(engine.OutOfMemory, match="one example at a time"):
        evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)


# --- shards -------------------------------------------------------------------------------------------------------

def shard_results(cfg, run_dir, n_shards, which="best"):
    s = cfg.settings(cfg.cells()[0])
    paths = []
    for i in range(1, n_shards + 1):
        paths.append(run_dir / "eval-shards" / f"{which}-{i}of{n_shards}.json")
        evaluate.evaluate(s, run_dir / "train.json", paths[-1], tracking=cfg.tracking, checkpoint=which,
                          shard=(i, n_shards))
    return s, paths


def test_shards_merge_into_the_unsharded_result(trained, tmp_path):
    cfg, run_dir = cell_copy(trained, tmp_path / "one", **NO_AA)
    whole = evaluate.evaluate_cell(cfg, cfg.cells()[0], run_dir)
    expected = outcomes_of(run_dir)

    cfg, run_dir = cell_copy(trained, tmp_path / "three", shards=3, **NO_AA)
    s, paths = shard_results(cfg, run_dir, 3)  # 4 blocks: shard 1 gets blocks 0 and 3
    assert [json.loads(p.read_text())["blocks"] for p in paths] == [[0, 3], [1], [2]]
    merged = evaluate.merge(s, paths[::-1], run_dir / "eval.json", tracking=cfg.tracking)
    assert outcomes_of(run_dir) == expected
    for key in ("clean", "pgd20", "cw", "mean", "nrr", "n_examples", "examples", "eval_fingerprint"):
        assert merged[key] == whole[key]
    assert merged["shards"] == 3 and len(merged["shard_wall_s"]) == 3

    with pytest.raises(results.MergeError, match=r"shards \[1, 2\] given, but the evaluation was split into 3"):
        evaluate.merge(s, paths[:2], tmp_path / "x.json", tracking=cfg.tracking)
    other = cfg_of(tmp_path / "three", shards=3, pgd_steps=2, **NO_AA).settings(cfg.cells()[0])
    with pytest.raises(evaluate.EvaluationError, match="best-1of3.json was computed with other evaluation settings"):
        evaluate.merge(other, paths, tmp_path / "x.json", tracking=cfg.tracking)


def test_evaluation_fingerprint_ignores_shards_and_checkpoints(tmp_path):
    base = cfg_of(tmp_path).settings(cfg_of(tmp_path).cells()[0])
    for changes in ({"shards": 4}, {"checkpoints": ["best", "last"]}):
        cfg = cfg_of(tmp_path, **changes)
        assert cfg.settings(cfg.cells()[0]).eval_fingerprint == base.eval_fingerprint
    cfg = cfg_of(tmp_path, block_size=4)  # another block size draws other randomness
    assert cfg.settings(cfg.cells()[0]).eval_fingerprint != base.eval_fingerprint


# --- refused inputs, through the CLI ------------------------------------------------------------------------------

def test_swapped_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    raw = tiny_config(results_dir=str(tmp_path), tracking={"enabled": False}, data={"train_subset": 128},
                      train={"epochs": 1, "val_attack_steps": 1}, eval={"n_examples": 8, **NO_AA},
                      grid=[{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["noise"],
                             "rpat": [False, True], "seed": [0]},
                            {"dataset": ["digits"], "model": ["resnet18"], "norm": ["linf"], "method": ["noise"],
                             "rpat": [False], "seed": [0]}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)
    for cell in cfg.cells():
        train.train_cell(cfg, cell, cfg.run_dir(cell))
    plain, with_rpat, resnet = (cfg.run_dir(c) for c in cfg.cells())
    assert "resnet18" in str(resnet) and "noise+rpat" in str(with_rpat)
    argv = ["evaluate", "--config", str(path), "--cell", "digits/cnn/linf/noise/seed0"]
    for foreign, model in ((resnet, "resnet18"), (with_rpat, "cnn")):
        shutil.copy2(foreign / "checkpoint-best.pt", plain / "checkpoint-best.pt")
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rpat evaluate: error: checkpoint ")
        assert f"is not the one cell digits/cnn/linf/noise/seed0 trained (model '{model}'" in err
        assert not (plain / "eval.json").exists()


# --- the workflow -------------------------------------------------------------------------------------------------

def test_dry_run_plans_one_job_per_shard_and_a_merge_per_checkpoint(tmp_path):
    raw = tiny_config(eval={"shards": 3, "checkpoints": ["best", "last"]})
    (tmp_path / "sharded.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--snakefile", str(ROOT / "Snakefile"),
                          "--configfile", "sharded.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("Job stats:")[1].split("Reasons:")[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    # 2 cells x 2 checkpoints: 3 shard jobs and 1 merge each
    assert counts == {"train": 2, "evaluate_shard": 12, "evaluate": 4, "perceive": 2, "report": 1, "all": 1, "total": 22}
    cell_dir = "results/runs/digits/cnn/linf/pgd_at/seed0"
    assert (f"--shard 2/3 --out {cell_dir}/eval-shards/last-2of3.json --outcomes "
            f"{cell_dir}/eval-shards/last-2of3.npz") in out.stdout
    assert (f"--merge {cell_dir}/eval-shards/best-1of3.json {cell_dir}/eval-shards/best-2of3.json "
            f"{cell_dir}/eval-shards/best-3of3.json --out {cell_dir}/eval.json --outcomes {cell_dir}/outcomes.npz"
            ) in out.stdout


@pytest.mark.parametrize("profile", ["slurm", "slurm-gres"])
def test_slurm_profiles_signal_evaluation_jobs_before_the_time_limit(profile):
    rules = yaml.safe_load((ROOT / "profiles" / profile / "config.v8+.yaml").read_text())["set-resources"]
    for rule in ("train", "evaluate", "evaluate_shard"):
        assert rules[rule]["slurm_extra"] == "'--signal=B:USR1@300'", rule
