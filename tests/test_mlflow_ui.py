"""The MLflow UI, rendered by a real headless browser, shows a tiny grid's runs: the runs page of the README's URL
lists every run by its short name, and each run's page shows its tags (the full cell and its coordinates), its
training data and its logged model.

Needs Chromium (Debian's ``chromium`` package; .ci/run installs it). Without it the test skips, except under
``CI=true``, where it fails.
"""

import html
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from servers import wait_healthy
from tiny import tiny_config

from rpat import config, tracking, train

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
RUNS_VIEW = "workflowType=machine_learning"  # the UI's model-training view (its default view is GenAI's)


def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        message = "no headless browser: install Debian's chromium (apt-get install -y chromium) to run this test"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run installs it, so its apt-get step failed (see the CI log)")
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(chrome: str, url: str, expected: list[str], attempts: int = 3) -> str:
    """The text of the page at ``url`` as Chromium renders it (scripts run, data fetched); rendered again
    (the UI loads its data in several requests) until every ``expected`` string is in it or attempts run out."""
    text = ""
    for _ in range(attempts):
        dom = subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--window-size=1600,1200", "--virtual-time-budget=30000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=240).stdout
        text = html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)))
        if all(e in text for e in expected):
            break
    return text


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The tiny grid trained into a fresh SQLite store, and ``mlflow ui`` serving it, as the README starts it;
    yields (base URL, store client, experiment id)."""
    chrome = browser()
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = config.from_dict(tiny_config(experiment="ui", results_dir=str(root / "results"), tracking={"uri": uri}))
    for cell in cfg.cells():
        train.train_cell(cfg, cell, cfg.run_dir(cell))
    port = free_port()
    mlflow = [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen([*mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(server, port, "mlflow ui")
        client = MlflowClient(tracking_uri=uri)
        yield chrome, f"http://127.0.0.1:{port}", client, client.get_experiment_by_name("ui").experiment_id
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_ui_shows_every_run_with_its_tags(ui):
    chrome, base, client, exp_id = ui
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_name for r in runs) == ["pgd_at s0", "pgd_at+rpat s0"]

    url = tracking.runs_url(exp_id, base)  # what the README and the workflow give
    assert url == f"{base}/#/experiments/{exp_id}/runs?{RUNS_VIEW}"
    listing = page_text(chrome, url, [r.info.run_name for r in runs])
    assert "Run Name" in listing, listing[:2000]  # the runs table, not the GenAI overview
    for run in runs:
        assert run.info.run_name in listing, listing[:2000]

    for run in runs:
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        assert {"cell", "dataset", "model", "norm", "method", "rpat", "seed", "recipe"} <= set(tags)
        shown = [f"{k}: {v}" for k, v in tags.items()]
        text = page_text(chrome, f"{base}/#/experiments/{exp_id}/runs/{run.info.run_id}?{RUNS_VIEW}",
                         [run.info.run_name, *shown])
        missing = [s for s in [run.info.run_name, *shown] if s not in text]
        assert not missing, f"not on the page of run {run.info.run_name}: {missing}\n{text[:3000]}"
        assert "Logged models (1)" in text and "Datasets" in text and "train" in text
