"""A trained cell's selected checkpoint as an MLflow model of its run (``tracking.log_model``), and optionally a
version of a registered model (``tracking.register_model``).

The model is saved in MLflow's PyTorch flavour in the ``pt2`` format (``torch.export``): loading it runs no
pickled code, as with the checkpoints themselves (rpat/checkpoint.py), and needs torch but not rpat. It takes a
float batch of images in [0, 1] (N x C x H x W, any N) and returns logits; the normalisation is part of it.
The pip requirement is given, so MLflow never infers the environment (a subprocess that imports the model and
may look packages up on the network).
"""

from __future__ import annotations

from pathlib import Path

from rpat.tracking import CellRun

MODEL_NAME = "model"  # the logged model's name within its run


def _pinned_torch() -> str:
    from importlib.metadata import version

    return f"torch=={version('torch')}"  # torch.__version__ may carry a local tag (+cu130) pip cannot resolve


def _log(run: CellRun, path: Path, register: str | None, tags: dict[str, str]) -> None:
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from rpat import checkpoint, models

    ckpt = checkpoint.load(path)
    model = models.build_from_meta(ckpt)
    checkpoint.load_weights(model, ckpt["model"], path)
    model.eval()
    # two examples: torch.export makes a dimension of size 1 static, and the batch size must stay free
    example = np.zeros((2, ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]), dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    # created here, in the run's experiment: log_model would put it in the process's active one (Default)
    created = run.client.create_logged_model(run.client.get_run(run.run_id).info.experiment_id, name=MODEL_NAME,
                                             source_run_id=run.run_id, tags=tags)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(run.uri)  # log_model and the registry take the process's URI, not a client's
    try:
        info = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run.run_id, model_id=created.model_id,
                                        signature=signature, input_example=example,
                                        pip_requirements=[_pinned_torch()], serialization_format="pt2",
                                        registered_model_name=register, step=int(ckpt["epoch"]))
    finally:
        mlflow.set_tracking_uri(previous)
    if register is not None and info.registered_model_version is not None:
        for key, value in tags.items():
            run.client.set_model_version_tag(register, str(info.registered_model_version), key, value)


def log_model(run: CellRun, path: str | Path, register: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Log the checkpoint at ``path`` as the run's model named :data:`MODEL_NAME` (tagged ``tags``, at the step of
    its epoch); with ``register``, also as a new version of the registered model of that name (tagged alike).
    Like every tracking call, a failure is reported and never stops the job."""
    if run.client is None or run.run_id is None:
        return
    run.guard("model logging", _log, run, Path(path), register, tags or {})
