"""MLflow: a tracking failure never stops a job; reconciliation restores everything from the JSON files;
jobs can log to a tracking server (as on a cluster's login node)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from rpat import config, evaluate, tracking, train

RAW = {
    "experiment": "tracking-test",
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["pgd_at"], "rpat": [True],
              "seed": [0]}],
    "data": {"val_size": 64, "train_subset": 128, "augment": "none", "batch_size": 64},
    "threat": {"linf": {"eps": 0.2, "step": 0.1, "steps": 2}},
    "train": {"epochs": 3, "schedule": {"name": "constant"}, "val_attack_steps": 2},
    "eval": {"n_examples": 16, "pgd_steps": 2, "cw_steps": 2, "autoattack": {"enabled": False}},
}


def make_cfg(results, uri):
    return config.from_dict({**RAW, "results_dir": str(results), "tracking": {"uri": uri}})


def test_broken_tracking_never_stops_a_job_and_reconcile_restores_it(tmp_path, capsys):
    broken = make_cfg(tmp_path / "results", "sqlite:////proc/no-such-dir/mlflow.db")
    cell = broken.cells()[0]
    run_dir = tmp_path / "results" / "runs" / cell.id
    train.train_cell(broken, cell, run_dir)
    evaluate.evaluate_cell(broken, cell, run_dir)
    assert "MLflow" in capsys.readouterr().err  # warned, did not fail
    assert json.loads((run_dir / "eval.json").read_text())["clean"] >= 0

    uri = f"sqlite:///{tmp_path / 'good.db'}"
    good = make_cfg(tmp_path / "results", uri)
    added = tracking.reconcile(good, tmp_path / "results" / "runs")
    assert added["runs"] == 1 and added["artifacts"] == 2
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["cell"] == cell.id and run.data.tags["rpat"] == "on"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_rpat")] == [1, 2, 3]
    assert "test_clean" in run.data.metrics and run.data.params["train.epochs"] == "3"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"train.json", "eval.json"}

    again = tracking.reconcile(good, tmp_path / "results" / "runs")
    assert again == {"runs": 0, "metric_points": 0, "artifacts": 0}
    assert len(client.search_runs([exp.experiment_id])) == 1


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
    added = tracking.reconcile(cfg, tmp_path / "results" / "runs")
    assert added["metric_points"] == 1
    assert [m.value for m in client.get_metric_history(rec["mlflow_run_id"], "lost_metric")] == [1.5]
    assert client.get_run(rec["mlflow_run_id"]).data.tags["train_fingerprint"] == rec["fingerprint"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jobs_log_to_a_tracking_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(1)
        uri = f"http://127.0.0.1:{port}"
        cfg = make_cfg(tmp_path / "results", uri)
        cell = cfg.cells()[0]
        rec = train.train_cell(cfg, cell, tmp_path / "results" / "runs" / cell.id)
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(rec["mlflow_run_id"])
        assert run.data.tags["cell"] == cell.id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_clean")] == [1, 2, 3]
        assert "train.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.terminate()
        server.wait(timeout=30)


WRITER = """
import sys
from rpat.tracking import CellRun
i, uri = int(sys.argv[1]), sys.argv[2]
run = CellRun(uri, "concurrent", {"cell": f"c{i}", "seed": str(i)}, new=True)
run.log_params({"i": i})
for step in range(1, 31):
    run.log_metrics({"loss": 1.0 / step, "acc": float(step)}, step=step)
run.finish()
print(run.run_id)
"""


@pytest.mark.slow
def test_concurrent_writers_on_a_pre_initialised_store(tmp_path):
    """Eight jobs logging at once to one SQLite store created beforehand (as the workflow's onstart does)."""
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    assert tracking.init_store(uri, "concurrent") is not None
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert not any("MLflow" in o[1] for o in outs), [o[1][-500:] for o in outs]  # no logging failure at all
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert len(runs) == 8
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 30
