"""Clean and PGD accuracy over batches: the validation numbers training selects on (and evaluation's helper).

The PGD is the published code's evaluation adversary (advertorch: uniform random start, box clip before
the L2 rescale), the model in eval mode; counts stay on the device and are read once at the end.
"""

from __future__ import annotations

import torch

from rpat import attacks


@torch.no_grad()
def correct(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example correctness (bool) of the model's prediction."""
    return model(x).argmax(1) == y


def pgd_examples(model, x, y, threat, steps: int, loss: str = "ce", generator=None, start=None) -> torch.Tensor:
    """The evaluation PGD: ``steps`` steps of ``threat.step`` in the ``threat.norm`` ball of ``threat.eps``, from a
    uniform random start drawn from ``generator`` (or the given ``start``, see :func:`pgd_start`)."""
    if steps <= 0:
        return x
    return attacks.pgd(model, x, y, eps=threat.eps, step=threat.step, steps=steps, norm=threat.norm, loss=loss,
                       init="uniform", bn="eval", box_first=True, generator=generator, start=start)


def pgd_start(x, threat, generator=None) -> torch.Tensor:
    """The random start :func:`pgd_examples` draws for ``x`` from ``generator``; drawn once for many examples and
    sliced into batches, it gives every example the start it gets when all of them form one batch."""
    return attacks.random_start(x, threat.eps, threat.norm, "uniform", generator)


def accuracies(model, batches, threat, steps: int, loss: str = "ce", with_clean: bool = True) -> dict:
    """Clean and PGD accuracy (%) over ``batches``, model in eval mode; one host sync at the end."""
    was_training = model.training
    model.eval()
    clean = torch.zeros((), dtype=torch.long, device=batches.y.device)
    robust = torch.zeros_like(clean)
    for x, y in batches:
        if with_clean:
            clean += correct(model, x, y).sum()
        robust += correct(model, pgd_examples(model, x, y, threat, steps, loss), y).sum()
    model.train(was_training)
    n = len(batches.y)
    return {"clean": 100.0 * float(clean) / n, "pgd": 100.0 * float(robust) / n}
