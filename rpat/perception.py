"""The paper's perception measurements: how a model's logits move between a clean input and its perturbations.

z(.) are the logits of the model in eval mode (BatchNorm running statistics, no dropout), computed without
gradients. The logit MSE of two logit vectors is the mean over classes of their squared difference. Every
measurement is kept per example, so that a test set can be measured in shards, merged (``merge_shards``, in
example order) and then summarised (``summarize_motivation``, ``summarize_path``), and so that paired statistics
(rpat.stats) can resample examples.

- Motivation (the paper's figure "AT already learns better perception for failure cases"): for one perturbation
  x' of x (uniform noise in the eps-ball, or PGD-20), MSE(z(x), z(x')) over all examples, over the *success*
  cases (x' still classified correctly: defended) and over the *failure* cases (x' misclassified), beside the
  clean and perturbed accuracies (``motivation``).
- Path: along x_a = x + a (x' - x), a in [0, 1], the MSE between z(x_a) and the chord (1 - a) z(x) + a z(x')
  (``path_profile``). It is 0 at every a for a model whose logits are affine in its input; its mean over a and
  examples is the **path nonlinearity**. At the midpoint m = (x + x')/2 the published analysis tool also reports
  MSE(z(x), z(m)) and MSE(z(m), z(x')) (``midpoint_mses``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rpat.errors import UserError

MOTIVATION_KEYS = ("mse", "clean_correct", "defended")
PATH_KEYS = ("path_mse", "mid_clean", "mid_adv")


class BadPerceptionInput(UserError, ValueError):
    """Inputs of a perception measurement that do not fit together (shapes, alphas)."""


def logit_mse(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Per-example logit MSE: mean over the class (last) axis of (z_a - z_b)^2; [n, C] -> [n]."""
    if z_a.shape != z_b.shape:
        raise BadPerceptionInput(f"logit_mse: logits of shapes {tuple(z_a.shape)} and {tuple(z_b.shape)}; "
                                 "pass logits of the same examples and classes")
    return (z_a - z_b).pow(2).mean(dim=-1)


def split_by_outcome(per_example: torch.Tensor, defended: torch.Tensor) -> dict:
    """Means of a per-example value over all examples, the defended ones ("success") and the others ("failure").

    Returns {"all", "success", "failure"} (float64 means, NaN for an empty group) and the counts {"n",
    "n_success", "n_failure"}. These are means over examples. The published analysis tool (test_random_MSE /
    test_adv_acc_MSE of the reference eval.py) weights each batch's subset mean by the full batch size instead,
    which is not the mean over a subset's examples unless every batch has the same success rate.
    """
    values = per_example.detach().double().reshape(-1)
    defended = defended.detach().bool().reshape(-1).to(values.device)
    if values.shape != defended.shape:
        raise BadPerceptionInput(f"split_by_outcome: {values.numel()} values but {defended.numel()} outcomes; "
                                 "pass one outcome per example")
    out, counts = {}, {}
    for name, mask in (("all", torch.ones_like(defended)), ("success", defended), ("failure", ~defended)):
        k = int(mask.sum())
        out[name] = float(values[mask].mean()) if k else math.nan
        counts["n" if name == "all" else f"n_{name}"] = k
    return out | counts


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_pair(x: torch.Tensor, x_pert: torch.Tensor, what: str) -> None:
    if x.shape != x_pert.shape:
        raise BadPerceptionInput(f"{what}: clean inputs of shape {tuple(x.shape)} but perturbed inputs of shape "
                                 f"{tuple(x_pert.shape)}; pass one perturbed input per clean input")


def _batched(fn, n: int, batch_size: int, *tensors: torch.Tensor) -> dict:
    """fn on consecutive slices of ``tensors``; per-example results merged in order and moved to the CPU."""
    if batch_size < 1:
        raise BadPerceptionInput(f"batch_size must be at least 1, got {batch_size}")
    if n == 0:
        raise BadPerceptionInput("no examples to measure; pass at least one input")
    parts = [fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, n, batch_size)]
    return {k: v.cpu() for k, v in merge_shards(parts).items()}


def motivation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_pert: torch.Tensor, *,
               batch_size: int = 500) -> dict:
    """The motivation measurements of one perturbation x_pert of x (labels y).

    Returns ``summarize_motivation``'s summary (clean_acc, perturbed_acc in %, and the MSE(z(x), z(x_pert))
    split of ``split_by_outcome``) plus "per_example": {"mse": [n], "clean_correct": bool [n], "defended":
    bool [n]} (CPU tensors) for sharding and paired statistics. The model is put in eval mode and restored.
    """
    _check_pair(x, x_pert, "motivation")
    if len(y) != len(x):
        raise BadPerceptionInput(f"motivation: {len(x)} inputs but {len(y)} labels")

    @torch.no_grad()
    def one_batch(xb, yb, pb):
        z, z_pert = model(xb), model(pb)
        return {"mse": logit_mse(z, z_pert), "clean_correct": z.argmax(1) == yb, "defended": z_pert.argmax(1) == yb}

    with _eval_mode(model):
        per_example = _batched(one_batch, len(x), batch_size, x, y, x_pert)
    return summarize_motivation(per_example) | {"per_example": per_example}


def default_alphas(k: int = 11) -> torch.Tensor:
    """k evenly spaced points of [0, 1], both ends included (float64)."""
    if k < 2:
        raise BadPerceptionInput(f"the path needs at least 2 points (its two ends), got k={k}")
    return torch.linspace(0.0, 1.0, k, dtype=torch.float64)


def _check_alphas(alphas) -> torch.Tensor:
    alphas = default_alphas() if alphas is None else torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if alphas.numel() == 0 or bool(((alphas < 0) | (alphas > 1)).any()):
        raise BadPerceptionInput(f"path alphas must be a non-empty list of numbers in [0, 1], got {alphas.tolist()}")
    return alphas


def path_analysis(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, alphas=None, *,
                  batch_size: int = 500) -> dict:
    """Per-example path measurements: {"path_mse": [K, n], "mid_clean": [n], "mid_adv": [n]} (CPU tensors).

    path_mse[k, i] = MSE(z(x_a), (1 - a) z(x) + a z(x_adv)) for a = alphas[k] and x_a = x + a (x_adv - x);
    both interpolations use torch.lerp, exact at a = 0 and a = 1. mid_clean = MSE(z(x), z(m)), mid_adv =
    MSE(z(m), z(x_adv)) with m = (x + x_adv) / 2. alphas default to ``default_alphas()`` (11 points).
    """
    _check_pair(x, x_adv, "path_analysis")
    alphas = _check_alphas(alphas).tolist()

    @torch.no_grad()
    def one_batch(xb, ab):
        z, z_adv, z_mid = model(xb), model(ab), model((xb + ab) / 2)
        path = [logit_mse(model(torch.lerp(xb, ab, a)), torch.lerp(z, z_adv, a)) for a in alphas]
        return {"path_mse": torch.stack(path), "mid_clean": logit_mse(z, z_mid), "mid_adv": logit_mse(z_mid, z_adv)}

    with _eval_mode(model):
        return _batched(one_batch, len(x), batch_size, x, x_adv)


def path_profile(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, alphas=None, *,
                 batch_size: int = 500) -> torch.Tensor:
    """[K, n]: per-example MSE between z(x + a (x_adv - x)) and the chord (1 - a) z(x) + a z(x_adv), per a."""
    return path_analysis(model, x, x_adv, alphas, batch_size=batch_size)["path_mse"]


def midpoint_mses(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *,
                  batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (MSE(z(x), z(m)), MSE(z(m), z(x_adv))) with m = (x + x_adv) / 2."""
    pe = path_analysis(model, x, x_adv, [0.0], batch_size=batch_size)
    return pe["mid_clean"], pe["mid_adv"]


def nonlinearity(path_mse: torch.Tensor) -> torch.Tensor:
    """Per-example path nonlinearity: the mean over a of path_mse [K, n] -> [n] (float64)."""
    return path_mse.double().mean(dim=0)


def merge_shards(shards: Sequence[Mapping[str, torch.Tensor]]) -> dict:
    """Per-example dicts of consecutive shards of one test set, concatenated along the example (last) axis."""
    if not shards:
        raise BadPerceptionInput("merge_shards: no shards given")
    keys = list(shards[0])
    for i, shard in enumerate(shards):
        if list(shard) != keys:
            raise BadPerceptionInput(f"merge_shards: shard {i} has keys {list(shard)}, shard 0 has {keys}; "
                                     "merge measurements of the same kind")
    return {k: torch.cat([torch.as_tensor(s[k]) for s in shards], dim=-1) for k in keys}


def _percent(flags: torch.Tensor) -> float:
    return 100.0 * float(flags.double().mean()) if flags.numel() else math.nan


def summarize_motivation(per_example: Mapping[str, torch.Tensor]) -> dict:
    """JSON-able summary of ``motivation``'s per-example dict: accuracies (%) and the MSE split.

    {"clean_acc", "perturbed_acc", "mse": {"all", "success", "failure", "n", "n_success", "n_failure"}};
    an empty group's mean is NaN (json writes it as NaN).
    """
    _require(per_example, MOTIVATION_KEYS, "summarize_motivation")
    return {"clean_acc": _percent(per_example["clean_correct"]),
            "perturbed_acc": _percent(per_example["defended"]),
            "mse": split_by_outcome(per_example["mse"], per_example["defended"])}


def summarize_path(per_example: Mapping[str, torch.Tensor], alphas=None, defended: torch.Tensor | None = None) -> dict:
    """JSON-able summary of ``path_analysis``'s per-example dict.

    {"alphas": [K], "per_alpha": [K] means over examples, "nonlinearity": mean over a and examples,
    "mid_clean", "mid_adv": midpoint means, "n"}. With ``defended`` (the outcome of x_adv per example, e.g.
    ``motivation(...)["per_example"]["defended"]`` for the same x_adv), also "by_outcome": the
    ``split_by_outcome`` of the per-example nonlinearity and of both midpoint MSEs, as the published tool splits
    its midpoint numbers.
    """
    _require(per_example, PATH_KEYS, "summarize_path")
    path = per_example["path_mse"].double()
    alphas = _check_alphas(alphas)
    if path.dim() != 2 or path.shape[0] != alphas.numel():
        raise BadPerceptionInput(f"summarize_path: path_mse of shape {tuple(path.shape)} for {alphas.numel()} "
                                 "alphas; pass the alphas the path was measured at")
    per_ex = nonlinearity(path)
    out = {"alphas": alphas.tolist(), "per_alpha": path.mean(dim=1).tolist(), "nonlinearity": float(per_ex.mean()),
           "mid_clean": float(per_example["mid_clean"].double().mean()),
           "mid_adv": float(per_example["mid_adv"].double().mean()), "n": int(path.shape[1])}
    if defended is not None:
        out["by_outcome"] = {"nonlinearity": split_by_outcome(per_ex, defended),
                             "mid_clean": split_by_outcome(per_example["mid_clean"], defended),
                             "mid_adv": split_by_outcome(per_example["mid_adv"], defended)}
    return out


def _require(per_example: Mapping, keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in per_example]
    if missing:
        raise BadPerceptionInput(f"{what}: per-example measurements lack {missing}; it needs {list(keys)}")
