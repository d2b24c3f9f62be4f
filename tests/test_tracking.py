"""MLflow: a tracking failure never stops a job; reconciliation restores everything from the JSON files and
skips (and names) a malformed one; runs end FINISHED, KILLED or FAILED; summary metrics are not duplicated;
jobs started at once by hand lose no run, on a fresh SQLite store and on a tracking server."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from interrupt import signal_at_step
from servers import wait_healthy
from tiny import tiny_config, tiny_grid

from rpat import checkpoint, config, tracking, train
from rpat.jobs import evaluate
from rpat.reconcile import reconcile

ROOT = Path(__file__).resolve().parents[1]
RAW = tiny_config(experiment="tracking-test", grid=tiny_grid(rpat=[True]), train={"epochs": 3})


def make_cfg(results, uri, **changes):
    return config.from_dict(config.deep_merge(RAW, {"results_dir": str(results), "tracking": {"uri": uri},
                                                    **changes}))


def the_run(uri, experiment="tracking-test"):
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


@pytest.fixture(scope="module")
def untracked(tmp_path_factory):
    """One cell trained and evaluated with tracking off: train.json and eval.json, no MLflow run."""
    root = tmp_path_factory.mktemp("untracked")
    cfg = make_cfg(root / "results", None, tracking={"enabled": False})
    cell = cfg.cells()[0]
    train.train_cell(cfg, cell, cfg.run_dir(cell))
    evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    return cfg.run_dir(cell)


def test_broken_tracking_never_stops_a_job_and_reconcile_restores_it(tmp_path, capsys):
    broken = make_cfg(tmp_path / "results", "sqlite:////proc/no-such-dir/mlflow.db")
    cell = broken.cells()[0]
    run_dir = tmp_path / "results" / "runs" / cell.id
    rec = train.train_cell(broken, cell, run_dir)
    res = evaluate.evaluate_cell(broken, cell, run_dir)
    assert "MLflow" in capsys.readouterr().err  # warned, did not fail
    assert json.loads((run_dir / "eval.json").read_text())["clean"] >= 0

    uri = f"sqlite:///{tmp_path / 'good.db'}"
    good = make_cfg(tmp_path / "results", uri)
    added = reconcile(good)
    summary = {**rec["mlflow_metrics"], **res["mlflow_metrics"]}
    n_epoch_points = sum(len(h) - 1 for h in rec["history"])
    assert added == {"runs": 1, "metric_points": n_epoch_points + len(summary), "artifacts": 2, "problems": []}
    client, run = the_run(uri)
    assert run.data.tags["cell"] == cell.id and run.data.tags["rpat"] == "on"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_rpat")] == [1, 2, 3]
    # every summary metric, those of training included
    assert {"best_epoch", "best_val_metric", "train_wall_s", "test_clean"} <= set(summary)
    assert {k: run.data.metrics[k] for k in summary} == pytest.approx(summary)
    assert run.data.metrics["best_epoch"] == rec["selection"]["best_epoch"]
    assert run.data.params["train.epochs"] == "3" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"train.json", "eval.json"}

    again = reconcile(good)
    assert again == {"runs": 0, "metric_points": 0, "artifacts": 0, "problems": []}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_reconcile_fills_gaps_in_a_partially_logged_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = make_cfg(tmp_path / "results", uri)
    cell = cfg.cells()[0]
    run_dir = tmp_path / "results" / "runs" / cell.id
    rec = train.train_cell(cfg, cell, run_dir)
    client = MlflowClient(tracking_uri=uri)
    client.delete_tag(rec["mlflow_run_id"], "train_fingerprint")
    before = len(client.get_metric_history(rec["mlflow_run_id"], "val_pgd"))
    assert before == 3
    # Simulate an epoch whose live logging failed: the JSON has a metric MLflow lacks.
    rec["history"][1]["lost_metric"] = 1.5
    (run_dir / "train.json").write_text(json.dumps(rec))
    added = reconcile(cfg)
    assert added["metric_points"] == 1
    assert [m.value for m in client.get_metric_history(rec["mlflow_run_id"], "lost_metric")] == [1.5]
    assert client.get_run(rec["mlflow_run_id"]).data.tags["train_fingerprint"] == rec["fingerprint"]


MALFORMED = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "null": lambda text: "null",
    "missing keys": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "cell"}),
    "another cell's": lambda text: text.replace("pgd_at+rpat", "pgd_at"),
}


def test_malformed_result_files_are_reported_and_every_other_cell_reconciled(tmp_path, untracked):
    """One cell per (file, damage), reconciled before a good cell: each is named and skipped, the good one
    gets its run."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    damages = [(name, damage) for name in ("train.json", "eval.json") for damage in MALFORMED]
    cfg = make_cfg(tmp_path / "results", uri, grid=tiny_grid(rpat=[True], seed=list(range(len(damages) + 1))))
    *bad, good = cfg.cells()
    for cell in cfg.cells():
        shutil.copytree(untracked, cfg.run_dir(cell))
        for f in ("train.json", "eval.json"):  # each cell's files name their own cell
            path = cfg.run_dir(cell) / f
            path.write_text(path.read_text().replace('/seed0"', f'/seed{cell.seed}"'))
    damaged = []
    for cell, (name, damage) in zip(bad, damages):
        path = cfg.run_dir(cell) / name
        path.write_text(MALFORMED[damage](path.read_text()))
        damaged.append(str(path))

    added = reconcile(cfg)
    assert [p.split(" ")[0] for p in added["problems"]] == damaged
    assert all("delete it and rerun" in p for p in added["problems"])
    assert added["runs"] == 1 and added["artifacts"] == 2
    client, run = the_run(uri)
    assert run.data.tags["cell"] == good.id and "test_clean" in run.data.metrics


def test_sync_tracking_cli_names_the_malformed_file_and_succeeds(tmp_path, untracked):
    cfg = make_cfg(tmp_path / "results", f"sqlite:///{tmp_path / 'm.db'}")
    cell = cfg.cells()[0]
    shutil.copytree(untracked, cfg.run_dir(cell))
    (cfg.run_dir(cell) / "eval.json").write_text("null")
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(cfg.raw))
    out = subprocess.run([sys.executable, "-m", "rpat", "sync-tracking", "--config", str(cfg_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"skipped: {cfg.run_dir(cell) / 'eval.json'} holds NoneType, not a JSON object" in out.stderr
    assert "added 0 runs" in out.stdout and "skipped 1 cell(s) with a malformed result file" in out.stdout


def test_rerunning_evaluate_logs_the_test_metrics_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = make_cfg(tmp_path / "results", uri, train={"epochs": 1})
    cell = cfg.cells()[0]
    rec = train.train_cell(cfg, cell, cfg.run_dir(cell))
    client = MlflowClient(tracking_uri=uri)
    run_id = rec["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"  # training ends its run
    first = evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))  # same settings, same results: nothing new
    for key in first["mlflow_metrics"]:
        assert len(client.get_metric_history(run_id, key)) == 1, key
    assert reconcile(cfg)["metric_points"] == 0
    # Evaluated on other examples: the new value is logged (once) and is the run's latest.
    other = make_cfg(tmp_path / "results", uri, train={"epochs": 1}, eval={"n_examples": 8})
    res = evaluate.evaluate_cell(other, cell, other.run_dir(cell))
    hist = client.get_metric_history(run_id, "test_clean")
    assert [m.value for m in hist] in ([first["clean"], res["clean"]], [first["clean"]])
    assert client.get_run(run_id).data.metrics["test_clean"] == res["clean"]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_runs_end_killed_on_a_signal_and_failed_on_an_error(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = make_cfg(tmp_path / "results", uri, train={"epochs": 2})
    cell = cfg.cells()[0]
    client = MlflowClient(tracking_uri=uri)
    restore = signal_at_step(monkeypatch, 2)  # epoch 1, step 2 of 2
    with pytest.raises(train.Preempted):
        train.train_cell(cfg, cell, cfg.run_dir(cell))
    _, run = the_run(uri)
    assert run.info.status == "KILLED"
    restore()
    rec = train.train_cell(cfg, cell, cfg.run_dir(cell))  # resumed: the same run, running again, then FINISHED
    assert rec["mlflow_run_id"] == run.info.run_id and client.get_run(run.info.run_id).info.status == "FINISHED"

    ckpt = cfg.run_dir(cell) / "checkpoint-best.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    ckpt.write_bytes(good)
    evaluate.evaluate_cell(cfg, cell, cfg.run_dir(cell))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    diverging = make_cfg(tmp_path / "other", uri, train={"epochs": 1, "lr": 1e30})
    with pytest.raises(train.NonFiniteLoss):
        train.train_cell(diverging, cell, diverging.run_dir(cell))
    latest = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert latest.info.run_id != run.info.run_id and latest.info.status == "FAILED"


def test_end_status_of_each_way_a_job_ends():
    assert tracking.end_status(None) == "FINISHED"
    assert tracking.end_status(train.Preempted("signal")) == "KILLED"
    assert tracking.end_status(KeyboardInterrupt()) == "KILLED"
    assert tracking.end_status(train.NonFiniteLoss("nan")) == "FAILED"
    assert tracking.end_status(RuntimeError("bug")) == "FAILED"


def test_retry_waits_out_a_busy_store_and_raises_anything_else():
    attempts = []

    def busy_twice():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        if len(attempts) == 2:  # what a tracking server out of database connections answers
            raise RuntimeError("BAD_REQUEST: QueuePool limit of size 5 overflow 10 reached, connection timed out")
        return "done"

    assert tracking.retry(busy_twice) == "done" and len(attempts) == 3
    assert attempts[1] - attempts[0] >= 0.1 and attempts[2] - attempts[1] >= 0.2  # backoff doubles
    with pytest.raises(ValueError):
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("not transient")))
    with pytest.raises(RuntimeError, match="locked"):
        tracking.retry(lambda: (_ for _ in ()).throw(RuntimeError("database is locked")), attempts=2)


# ---------------------------------------------------------------------------------------------
# A tracking server, and jobs started at once by hand


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with two workers on a fresh SQLite store, configured as the README says (no connection
    pool: MLflow's log_batch holds a pooled connection while it takes a second one, so some 15 batches at once
    exhaust the default pool and stall every request for its 30 s timeout); yields (uri, its database file)."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"})
    try:
        wait_healthy(server, port, "mlflow server")
        yield f"http://127.0.0.1:{port}", root / "srv.db"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_jobs_log_to_a_tracking_server(tmp_path, mlflow_server):
    uri, _ = mlflow_server
    cfg = make_cfg(tmp_path / "results", uri)
    cell = cfg.cells()[0]
    rec = train.train_cell(cfg, cell, tmp_path / "results" / "runs" / cell.id)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(rec["mlflow_run_id"])
    assert run.data.tags["cell"] == cell.id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_clean")] == [1, 2, 3]
    assert "train.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


WRITERS, STEPS, METRICS = 32, 20, ("loss", "acc")
WRITER = f"""
import sys
from rpat.tracking import CellRun
i, uri = int(sys.argv[1]), sys.argv[2]
with CellRun(uri, "concurrent", {{"cell": f"c{{i}}", "seed": str(i)}}, new=True) as run:
    run.log_params({{"i": i}})
    for step in range(1, {STEPS} + 1):
        run.log_metrics({{"loss": 1.0 / step, "acc": float(step)}}, step=step)
print(run.run_id)
"""


def run_writers(uri: str) -> float:
    """WRITERS processes started at once, each one run of STEPS steps; returns the wall time."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(WRITERS)]
    outs = [p.communicate(timeout=900) for p in procs]
    seconds = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert not any("MLflow" in o[1] for o in outs), [o[1][-800:] for o in outs if "MLflow" in o[1]]  # no failure
    print(f"{WRITERS} writers x {STEPS} steps on {uri.split(':')[0]}: {seconds:.0f} s")
    return seconds


def assert_every_run_and_row(uri: str, db: Path) -> None:
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id], max_results=1000)
    assert len(runs) == WRITERS
    assert sorted(r.data.tags["cell"] for r in runs) == sorted(f"c{i}" for i in range(WRITERS))
    assert {r.info.status for r in runs} == {"FINISHED"}
    with sqlite3.connect(db) as con:  # the rows themselves, not MLflow's view of them
        rows = con.execute("select count(*) from metrics join runs using (run_uuid) join experiments e "
                           "on runs.experiment_id = e.experiment_id where e.name = 'concurrent'").fetchone()[0]
        assert rows == WRITERS * STEPS * len(METRICS)
        assert con.execute("select count(*) from experiments where name = 'concurrent'").fetchone()[0] == 1


@pytest.mark.slow
def test_concurrent_writers_on_a_fresh_sqlite_store(tmp_path):
    """32 jobs started at once by hand (no workflow onstart) on a store that does not exist yet."""
    db = tmp_path / "fresh.db"
    run_writers(f"sqlite:///{db}")
    assert_every_run_and_row(f"sqlite:///{db}", db)
    assert (tmp_path / "fresh.db.lock").is_file()


@pytest.mark.slow
def test_concurrent_writers_on_a_server_without_the_experiment(mlflow_server):
    uri, db = mlflow_server
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("concurrent") is None
    run_writers(uri)
    assert_every_run_and_row(uri, db)
