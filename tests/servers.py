"""Wait for a server the test started (an MLflow tracking server or `mlflow ui`)."""

import subprocess
import time
import urllib.request

import pytest


def wait_healthy(server: subprocess.Popen, port: int, what: str, timeout: float = 180) -> None:
    """Poll ``/health`` on 127.0.0.1:``port`` until it answers; fail with the server's stderr if it exits or
    ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                pytest.fail(f"{what} did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(1)
