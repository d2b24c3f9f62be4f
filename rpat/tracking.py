"""MLflow: the one place that names experiments, runs, params, metrics, tags, inputs and artifacts (the logged
model: rpat/logged_model.py).

The JSON files a job writes are the source of truth; MLflow is a browsable copy (``rpat sync-tracking`` makes it
hold them: rpat/reconcile.py). Every call here is guarded: a tracking failure is reported on stderr and never stops
a training job.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``; the config's
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` override it. One experiment per config; one run per grid
cell, with a short name (:func:`rpat.cells.run_name`) and tagged with the cell and its coordinates; ``train``
creates it, ``evaluate`` adds to it, and each job ends it FINISHED, KILLED or FAILED. Jobs may start at once
without the workflow's ``onstart``: a SQLite store is created under a file lock, an experiment another job
created first is looked up again, and SQLite's "database is locked" is retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DATASET_DIGEST_CHARS = 36  # the most MLflow's store keeps of a data set's digest
# Declares an experiment one of model training, for MLflow 3 UIs that choose their view by it (3.17's follows
# the URL instead: runs_url); without it they may open on GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(configured: str | None = None) -> str:
    """Config's ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


def warn(what: str, err: BaseException) -> None:
    print(f"[rpat] MLflow {what} failed ({type(err).__name__}: {err}); the JSON results are unaffected",
          file=sys.stderr)


def _quiet_mlflow() -> None:
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


TRANSIENT = (
    "database is locked",  # SQLite: another writer held the lock past the busy timeout
    "database is busy",
    "QueuePool limit",  # a tracking server out of database connections (it answers BAD_REQUEST)
)


def _transient(err: BaseException) -> bool:
    """An error that goes away when the store is less busy: worth retrying."""
    return any(s in str(err) for s in TRANSIENT)


def _already_exists(err: BaseException) -> bool:
    """Another job created the same thing first (a server's RESOURCE_ALREADY_EXISTS, SQLite's UNIQUE)."""
    text = f"{getattr(err, 'error_code', '')} {err}"
    return any(s in text for s in ("RESOURCE_ALREADY_EXISTS", "UNIQUE constraint failed", "IntegrityError"))


def retry(fn, *args, attempts: int = 8, **kwargs):
    """``fn(*args, **kwargs)``, retried with exponential backoff (0.1 s doubling, jittered; up to about 25 s in
    all) while the store is busy (:data:`TRANSIENT`); any other error, or the last attempt's, is raised."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only transient errors are retried
            if attempt == attempts - 1 or not _transient(e):
                raise
            time.sleep(0.1 * 2 ** attempt * (1 + random.random()))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold an exclusive lock on ``<db>.lock`` beside a SQLite store (nothing for a server): MLflow creates a
    fresh store's schema in several statements, and two processes doing it at once corrupt it."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _experiment_id(client, uri: str, experiment: str) -> str:
    """The experiment's id, created (tagged :data:`EXPERIMENT_KIND`) if needed; when another job creates it first,
    it is looked up again. An experiment without a kind (made by an older rpat) is given it."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    db = sqlite_path(uri)
    artifact_location = (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    except Exception as e:  # noqa: BLE001
        if not _already_exists(e):
            raise
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"experiment {experiment!r} was reported to exist but cannot be found")
    return exp.experiment_id


def open_store(uri: str, experiment: str):
    """An MlflowClient on ``uri`` and the experiment's id, the store's schema and the experiment created if
    needed. A SQLite store is opened under :func:`store_lock`, so jobs started at once by hand (no workflow
    ``onstart``) can all be the first."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    if sqlite_path(uri) is not None:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - seconds of imports, done before the lock
    with store_lock(uri):
        client = retry(MlflowClient, tracking_uri=uri)  # creates or migrates a SQLite store's schema
        return client, retry(_experiment_id, client, uri, experiment)


def runs_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the MLflow UI at ``base`` (``mlflow ui``'s default address). MLflow 3.17's UI picks
    its view from ``workflowType`` in the URL (else the browser's last choice, at first GenAI's traces); older 3.x
    UIs read the experiment's kind (:data:`EXPERIMENT_KIND`)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def init_store(uri: str, experiment: str) -> str | None:
    """Create the store's schema and the experiment (the workflow does it once, before jobs fan out).
    Returns the experiment id, or None if tracking is unavailable."""
    try:
        return open_store(uri, experiment)[1]
    except Exception as e:  # noqa: BLE001 - tracking must never stop the pipeline
        warn("store initialisation", e)
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


def end_status(err: BaseException | None) -> str:
    """How a job's run ends: FINISHED on success, KILLED when stopped (a signal's Preempted, Ctrl-C),
    FAILED on any other error."""
    from rpat.preemption import Preempted

    if err is None:
        return "FINISHED"
    return "KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED"


def same_value(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (math.isnan(a) and math.isnan(b)))


class CellRun:
    """The MLflow run of one grid cell. All methods are no-ops after the first failure.

    Used as a context manager by each job: entering marks the run RUNNING (evaluation re-opens the run
    training ended), leaving ends it with :func:`end_status` of the job's outcome.
    """

    def __init__(self, uri: str | None, experiment: str, tags: dict[str, str], run_id: str | None = None,
                 enabled: bool = True, new: bool = False, name: str = ""):
        """Attach to ``run_id``, else (unless ``new``) to the cell's latest run, else create one named ``name``
        (default: the ``cell`` tag, the full cell id, which every run carries).

        A new run of a cell tags the cell's older runs ``superseded=true`` so the UI can hide them.
        """
        self.run_id: str | None = None
        self.client = None
        self.name = name
        if not enabled:
            return
        try:
            self.uri = tracking_uri(uri)
            self.client, exp_id = open_store(self.uri, experiment)
            if run_id is not None and self._exists(run_id):
                self.run_id = run_id
            else:
                self.run_id = retry(self._find_or_create, exp_id, tags, new)
        except Exception as e:  # noqa: BLE001
            warn("run creation", e)
            self.client = None

    def _exists(self, run_id: str) -> bool:
        try:
            retry(self.client.get_run, run_id)
            return True
        except Exception:  # noqa: BLE001 - unknown in this store: find or create
            return False

    def _find_or_create(self, exp_id: str, tags: dict[str, str], new: bool) -> str:
        previous = self.client.search_runs([exp_id], filter_string=f"tags.cell = '{tags['cell']}'",
                                           order_by=["attributes.start_time DESC"])
        if previous and not new:
            return previous[0].info.run_id
        for run in previous:
            self.client.set_tag(run.info.run_id, "superseded", "true")
        all_tags = {**tags, "mlflow.runName": self.name or tags["cell"]}
        commit = git_commit()
        if commit:
            all_tags["git_commit"] = commit
        return self.client.create_run(exp_id, tags=all_tags).info.run_id

    def guard(self, what: str, fn, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)``, retried while the store is busy; a failure is reported (naming ``what``), never
        raised; nothing is done once the run could not be opened."""
        if self.client is None or self.run_id is None:
            return
        try:
            retry(fn, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            warn(what, e)

    def __enter__(self) -> "CellRun":
        self.guard("run start", lambda: self.client.update_run(self.run_id, status="RUNNING"))
        return self

    def __exit__(self, kind, err, tb) -> bool:
        self.finish(end_status(err))
        return False

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params)]

        def log():
            existing = self.client.get_run(self.run_id).data.params
            fresh = [p for p in items if p.key not in existing]
            for i in range(0, len(fresh), 100):
                self.client.log_batch(self.run_id, params=fresh[i:i + 100])

        self.guard("param logging", log)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics at ``step`` (an epoch); without a step, the run's summary metrics (best epoch, test
        accuracies), logged at step 0 only where the run lacks them or holds another value, so re-running
        a job does not duplicate them."""
        from mlflow.entities import Metric

        values = {k: float(v) for k, v in metrics.items() if v is not None}

        def log():
            if step is None:
                latest = self.client.get_run(self.run_id).data.metrics
                fresh = {k: v for k, v in values.items() if not same_value(latest.get(k), v)}
            else:
                fresh = values
            ts = int(time.time() * 1000)
            if fresh:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step or 0) for k, v in fresh.items()])

        self.guard("metric logging", log)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.guard("tagging", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_dataset(self, name: str, split: str, digest: str, rows: int) -> None:
        """Record data set ``name``'s ``split`` (``train``, ``val``, ``test``: the input's context) as an input of
        the run, identified by ``digest`` cut to MLflow's 36 characters (:data:`DATASET_DIGEST_CHARS`): training
        logs its splits' :func:`rpat.data.digest`, evaluation eval.json's ``examples.digest``."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:DATASET_DIGEST_CHARS], source_type="rpat",
                          source=json.dumps({"dataset": name, "split": split}), profile=json.dumps({"num_rows": rows}))
        item = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)])
        self.guard("dataset logging", lambda: self.client.log_inputs(self.run_id, datasets=[item]))

    def log_artifact(self, path: str | Path) -> None:
        self.guard("artifact upload", lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, status: str = "FINISHED") -> None:
        self.guard("run end", lambda: self.client.set_terminated(self.run_id, status))
