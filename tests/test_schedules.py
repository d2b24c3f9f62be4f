"""Learning-rate schedules (docs/faithfulness.md: "Optimiser and learning-rate schedules", D10) against hand values and torch's schedulers.

rpat epochs are 1-based and ``fraction`` = (i+1)/n is the part of the epoch done after step i, exactly as
rpat.train calls ``lr_at``. The reference's 0-based epoch e is rpat's epoch e + 1, so ReBAT's per-iteration
time t = e + (i+1)/n equals rpat's epoch - 1 + fraction.
"""

from __future__ import annotations

import math

import pytest
import torch

from rpat.schedules import SCHEDULES, lr_at

MULTISTEP = {"name": "multistep", "milestones": [100, 105], "gamma": 0.1}
PIECEWISE = {"name": "piecewise", "milestones": [100, 150], "factor": 1.5}
N = 391  # CIFAR-10 train batches of 128 (50000 / 128, rounded up)


def test_known_names():
    assert set(SCHEDULES) == {"constant", "multistep", "cosine", "piecewise"}


def test_multistep_benchmarks_110_epochs():
    # docs/faithfulness.md "Optimiser and learning-rate schedules": E = 110 -> lr 0.1 (epochs 1-100), 0.01 (101-105), 0.001 (106-110), stepped per epoch.
    for epoch in range(1, 111):
        expected = 0.1 if epoch <= 100 else (0.01 if epoch <= 105 else 0.001)
        for fraction in (1 / N, 0.5, 1.0):  # per epoch: the fraction does not matter
            assert lr_at(MULTISTEP, 0.1, epoch, fraction, 110) == pytest.approx(expected, rel=1e-12), (epoch, fraction)


def test_multistep_matches_torch_multisteplr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 105], gamma=0.1)
    for epoch in range(1, 111):
        assert lr_at(MULTISTEP, 0.1, epoch, 1.0, 110) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        sched.step()


def test_multistep_200_epochs_reference_milestones():
    # Default E = 200: milestones [int(0.5E), int(0.75E)] = [100, 150]
    s = {"name": "multistep", "milestones": [100, 150], "gamma": 0.1}
    assert lr_at(s, 0.1, 100, 1.0, 200) == pytest.approx(0.1)
    assert lr_at(s, 0.1, 101, 1 / N, 200) == pytest.approx(0.01)
    assert lr_at(s, 0.1, 150, 1.0, 200) == pytest.approx(0.01)
    assert lr_at(s, 0.1, 151, 1 / N, 200) == pytest.approx(0.001)


def test_constant():
    for epoch in (1, 50, 200):
        for fraction in (1 / N, 1.0):
            assert lr_at({"name": "constant"}, 0.05, epoch, fraction, 200) == 0.05


@pytest.mark.parametrize("epochs", [10, 110])
def test_cosine_matches_torch_cosineannealinglr(epochs):
    # docs/faithfulness.md "Optimiser and learning-rate schedules": CosineAnnealingLR(T_max = E), stepped once per epoch after training.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(1, epochs + 1):
        torch_lr = opt.param_groups[0]["lr"]
        hand = 0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        for fraction in (1 / N, 1.0):
            got = lr_at({"name": "cosine"}, 0.1, epoch, fraction, epochs)
            assert got == pytest.approx(torch_lr, rel=1e-9, abs=1e-14), epoch
            assert got == pytest.approx(hand, rel=1e-12, abs=1e-16), epoch
        opt.step()
        sched.step()
    assert lr_at({"name": "cosine"}, 0.1, 1, 1.0, epochs) == 0.1


def ref_piecewise(t, lr_max=0.1, stage1=100, stage2=150, factor=1.5):
    """ReBAT's lr_schedule(t) (docs/faithfulness.md "Optimiser and learning-rate schedules")."""
    if t < stage1:
        return lr_max
    if t < stage2:
        return lr_max / factor
    return lr_max / factor**2


def test_piecewise_boundaries_per_iteration():
    def lr(epoch, i):
        return lr_at(PIECEWISE, 0.1, epoch, (i + 1) / N, 200)

    # epoch 100 (reference e = 99): the second-to-last step has t = 99 + 390/391 < 100, the last has t = 100.0
    assert 99 + (N - 1) / N < 100 and 99 + N / N == 100.0
    assert lr(100, N - 2) == pytest.approx(0.1, rel=1e-15)
    assert lr(100, N - 1) == pytest.approx(0.1 / 1.5, rel=1e-15)
    assert lr(101, 0) == pytest.approx(0.1 / 1.5, rel=1e-15)
    # epoch 150: t = 150.0 on its last step
    assert lr(150, N - 2) == pytest.approx(0.1 / 1.5, rel=1e-15)
    assert lr(150, N - 1) == pytest.approx(0.1 / 2.25, rel=1e-15)
    assert lr(151, 0) == pytest.approx(0.1 / 2.25, rel=1e-15)
    # ends
    assert lr(1, 0) == 0.1
    assert lr(200, N - 1) == pytest.approx(0.1 / 2.25, rel=1e-15)


def test_piecewise_matches_reference_every_iteration_near_the_milestones():
    for epoch in (1, 2, 99, 100, 101, 149, 150, 151, 200):
        e = epoch - 1  # the reference's 0-based epoch
        for i in range(N):
            expected = ref_piecewise(e + (i + 1) / N)
            assert lr_at(PIECEWISE, 0.1, epoch, (i + 1) / N, 200) == pytest.approx(expected, rel=1e-15), (epoch, i)


def test_piecewise_defaults_are_rebat_recipe():
    assert lr_at({"name": "piecewise"}, 0.1, 100, 1.0, 200) == pytest.approx(0.1 / 1.5, rel=1e-15)
    assert lr_at({"name": "piecewise"}, 0.1, 100, (N - 1) / N, 200) == 0.1
    assert lr_at({"name": "piecewise"}, 0.1, 150, 1.0, 200) == pytest.approx(0.1 / 2.25, rel=1e-15)


def test_piecewise_other_factor():
    # ReBAT++ recommends --lr-factor 1.7
    s = {"name": "piecewise", "milestones": [100, 150], "factor": 1.7}
    assert lr_at(s, 0.1, 120, 0.5, 200) == pytest.approx(0.1 / 1.7, rel=1e-15)
    assert lr_at(s, 0.1, 160, 0.5, 200) == pytest.approx(0.1 / 1.7**2, rel=1e-15)


@pytest.mark.parametrize("name", ["linear", "step", "Cosine", ""])
def test_unknown_schedule_raises(name):
    with pytest.raises(ValueError):
        lr_at({"name": name}, 0.1, 1, 1.0, 10)
