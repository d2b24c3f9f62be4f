"""MLflow: the one place that names experiments, runs, params, metrics, tags and artifacts.

The JSON files a job writes are the source of truth; MLflow is a browsable copy. Every call here
is guarded: a tracking failure is reported on stderr and never stops a training job.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``; the config's
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` override it. One experiment per config; one run per grid
cell, tagged with the cell's coordinates; ``train`` creates it, ``evaluate`` adds to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(configured: str | None = None) -> str:
    """Config's ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


def _warn(what: str, err: BaseException) -> None:
    print(f"[rpat] MLflow {what} failed ({type(err).__name__}: {err}); the JSON results are unaffected",
          file=sys.stderr)


def _quiet_mlflow() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def init_store(uri: str, experiment: str) -> str | None:
    """Create the store's schema and the experiment once, before jobs fan out (concurrent creation of a
    fresh SQLite store corrupts it). Returns the experiment id, or None if tracking is unavailable."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            artifact_location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
        return client.create_experiment(experiment, artifact_location=artifact_location)
    except Exception as e:  # noqa: BLE001 - tracking must never stop the pipeline
        _warn("store initialisation", e)
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from flatten(v, key)
        else:
            yield key, v


class CellRun:
    """The MLflow run of one grid cell. All methods are no-ops after the first failure."""

    def __init__(self, uri: str | None, experiment: str, tags: dict[str, str], run_id: str | None = None,
                 enabled: bool = True, new: bool = False):
        """Attach to ``run_id``, else (unless ``new``) to the cell's latest run, else create one.

        A new run of a cell tags the cell's older runs ``superseded=true`` so the UI can hide them.
        """
        self.run_id: str | None = None
        self.client = None
        if not enabled:
            return
        try:
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()
            self.uri = tracking_uri(uri)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp_id = init_store(self.uri, experiment)
            if exp_id is None:
                raise RuntimeError(f"no experiment {experiment!r}")
            if run_id is not None:
                try:
                    self.client.get_run(run_id)
                    self.run_id = run_id
                except Exception:  # noqa: BLE001 - unknown in this store: find or create below
                    pass
            if self.run_id is None:
                previous = self.client.search_runs([exp_id], filter_string=f"tags.cell = '{tags['cell']}'",
                                                   order_by=["attributes.start_time DESC"])
                if previous and not new:
                    self.run_id = previous[0].info.run_id
                else:
                    for run in previous:
                        self.client.set_tag(run.info.run_id, "superseded", "true")
                    all_tags = {**tags, "mlflow.runName": tags["cell"]}
                    commit = git_commit()
                    if commit:
                        all_tags["git_commit"] = commit
                    self.run_id = self.client.create_run(exp_id, tags=all_tags).info.run_id
        except Exception as e:  # noqa: BLE001
            _warn("run creation", e)
            self.client = None

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            _warn(what, e)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params)]

        def log():
            existing = self.client.get_run(self.run_id).data.params
            fresh = [p for p in items if p.key not in existing]
            for i in range(0, len(fresh), 100):
                self.client.log_batch(self.run_id, params=fresh[i:i + 100])

        self._guard("param logging", log)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        self._guard("metric logging", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("tagging", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: str | Path) -> None:
        self._guard("artifact upload", lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("run end", lambda: self.client.set_terminated(self.run_id, status))


def reconcile(cfg, runs_dir: str | Path) -> dict:
    """Make MLflow hold every cell's JSON results (idempotent): the run, its params and tags, every
    epoch's metrics, the test metrics and the JSON artifacts, whatever live logging managed to write.
    Returns counts of what was added."""
    from rpat.files import read_json

    added = {"runs": 0, "metric_points": 0, "artifacts": 0}
    if not cfg.tracking["enabled"]:
        return added
    try:
        from mlflow.entities import Metric
    except Exception as e:  # noqa: BLE001
        _warn("reconciliation", e)
        return added
    for cell in cfg.cells():
        cell_dir = Path(runs_dir) / cell.id
        train_path, eval_path = cell_dir / "train.json", cell_dir / "eval.json"
        if not train_path.is_file():
            continue
        record = read_json(train_path)
        run = CellRun(cfg.tracking["uri"], cfg.experiment, cell.tags(), run_id=record.get("mlflow_run_id"),
                      enabled=True)
        if run.client is None or run.run_id is None:
            continue
        try:
            existing = run.client.get_run(run.run_id)
            if not existing.data.params:
                added["runs"] += 1
            run.log_params(record["settings"])
            run.set_tags({"train_fingerprint": record["fingerprint"]})
            points = [(k, v, h["epoch"]) for h in record["history"] for k, v in h.items() if k != "epoch"]
            points += [(k, v, 0) for k, v in record.get("mlflow_metrics", {}).items()]
            results = read_json(eval_path) if eval_path.is_file() else None
            if results:
                points += [(k, v, 0) for k, v in results.get("mlflow_metrics", {}).items()]
            have = {}
            for key in {k for k, _, _ in points}:
                have[key] = {m.step for m in run.client.get_metric_history(run.run_id, key)}
            ts = int(time.time() * 1000)
            missing = [Metric(k, float(v), ts, step) for k, v, step in points
                       if v is not None and step not in have[k]]
            for i in range(0, len(missing), 500):
                run.client.log_batch(run.run_id, metrics=missing[i:i + 500])
            added["metric_points"] += len(missing)
            listed = {a.path for a in run.client.list_artifacts(run.run_id)}
            for path in (train_path, eval_path):
                if path.is_file() and path.name not in listed:
                    run.client.log_artifact(run.run_id, str(path))
                    added["artifacts"] += 1
            if results:
                run.client.set_terminated(run.run_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            _warn(f"reconciliation of {cell.id}", e)
    return added
