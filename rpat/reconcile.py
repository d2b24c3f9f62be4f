"""``rpat sync-tracking``: MLflow made to hold every cell's JSON results, whatever live logging managed to write.

The JSON files a job writes are the source of truth (their names: :class:`rpat.cells.CellFiles`); MLflow is a
browsable copy (rpat/tracking.py). Reconciling adds what a run lacks - the run itself, its params and tags,
every epoch's metrics, the summary and test metrics, the JSON artifacts - and is idempotent.
"""

from __future__ import annotations

import time

from rpat.cells import Cell
from rpat.config import Config
from rpat.files import ResultFileError, read_record
from rpat.tracking import CellRun, retry, same_value, warn


TRAIN_KEYS = ("cell", "fingerprint", "history", "settings")
EVAL_KEYS = ("cell", "mlflow_metrics")


def _missing_points(client, run_id: str, record: dict, results: dict | None) -> list:
    """The metric points the JSON files hold and the run lacks: per-epoch metrics absent at their step, and
    summary metrics (step 0) whose latest value differs."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    epochs = [(k, float(v), h["epoch"]) for h in record["history"] for k, v in h.items()
              if k != "epoch" and v is not None]
    have = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {k for k, _, _ in epochs}}
    missing = [Metric(k, v, ts, step) for k, v, step in epochs if step not in have[k]]
    summary = {**record.get("mlflow_metrics", {}), **(results or {}).get("mlflow_metrics", {})}
    latest = client.get_run(run_id).data.metrics
    missing += [Metric(k, float(v), ts, 0) for k, v in summary.items()
                if v is not None and not same_value(latest.get(k), float(v))]
    return missing


def _reconcile_cell(cfg: Config, cell: Cell, added: dict) -> None:
    """One cell's run made to hold its JSON results (see :func:`reconcile`); malformed files raise
    :class:`rpat.files.ResultFileError` before MLflow is touched."""
    train_path, eval_path = cfg.files(cell).train_record, cfg.files(cell).primary_evaluation
    record = read_record(train_path, TRAIN_KEYS)
    results = read_record(eval_path, EVAL_KEYS) if eval_path.is_file() else None
    for path, rec in ((train_path, record), (eval_path, results)):
        if rec is not None and rec["cell"] != cell.id:
            raise ResultFileError(f"{path} holds the results of cell {rec['cell']!r}, not {cell.id}; it was copied "
                                  "or moved: delete it and rerun the cell's jobs")
    run = CellRun(cfg.tracking["uri"], cfg.experiment, cell.tags(), run_id=record.get("mlflow_run_id"),
                  name=cfg.settings(cell).run_name)
    if run.client is None or run.run_id is None:
        return
    client, run_id = run.client, run.run_id
    if not retry(client.get_run, run_id).data.params:
        added["runs"] += 1
    run.log_params(record["settings"])
    run.set_tags({"train_fingerprint": record["fingerprint"]})
    missing = retry(_missing_points, client, run_id, record, results)
    for i in range(0, len(missing), 500):
        retry(client.log_batch, run_id, metrics=missing[i:i + 500])
    added["metric_points"] += len(missing)
    listed = {a.path for a in client.list_artifacts(run_id)}
    for path in (train_path, eval_path):
        if path.is_file() and path.name not in listed:
            retry(client.log_artifact, run_id, str(path))
            added["artifacts"] += 1
    if results:
        retry(client.set_terminated, run_id, "FINISHED")


def reconcile(cfg: Config) -> dict:
    """Make MLflow hold every cell's JSON results (idempotent): the run, its params and tags, every
    epoch's metrics, the summary and test metrics and the JSON artifacts, whatever live logging managed
    to write. A malformed result file is reported (in ``problems``) and the other cells are reconciled.
    Returns counts of what was added, and the problems."""
    added: dict = {"runs": 0, "metric_points": 0, "artifacts": 0, "problems": []}
    if not cfg.tracking["enabled"]:
        return added
    for cell in cfg.cells():
        if not cfg.files(cell).train_record.is_file():
            continue
        try:
            _reconcile_cell(cfg, cell, added)
        except ResultFileError as e:
            added["problems"].append(str(e))
        except Exception as e:  # noqa: BLE001 - tracking must never stop the pipeline
            warn(f"reconciliation of {cell.id}", e)
    return added
