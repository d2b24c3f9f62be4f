"""Weight averaging for every method (rpat/averaging.py) and how the recipes plan it per epoch (rpat/recipes.py).

ReBAT's own averaging is checked by hand in tests/test_rebat.py; here the decay rules (EMA ramp, SWA's equal
weights), buffers, the saved step counter, and the epoch plans.
"""

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from rpat import models, recipes
from rpat.averaging import WeightAverage, decay_cap, step_decay
from rpat.objectives import OBJECTIVES
from rpat.settings import Threat, WeightAverageSettings


def scalar_net(w: float) -> nn.Module:
    net = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(w)
    return net


def weight(avg: WeightAverage) -> float:
    return float(avg.module.weight)


def test_decay_caps_by_hand():
    assert [decay_cap("ramp", n) for n in (1, 2, 91)] == [0.1, 2 / 11, 0.91]  # (1 + t)/(10 + t), t = n - 1
    assert [decay_cap("swa", n) for n in (1, 3)] == [0.5, 0.75]
    assert decay_cap("constant", 5) == 1.0
    assert step_decay("ramp", 0.999, 1) == 0.1 and step_decay("ramp", 0.999, 10**6) == 0.999
    assert step_decay("constant", 0.999, 1) == 0.999
    assert all(step_decay(rule, 0.0, 7) == 0.0 for rule in ("constant", "ramp", "swa"))


def test_swa_is_the_equal_weight_mean_of_the_models_since_the_last_copy():
    avg = WeightAverage(scalar_net(100.0), "swa")
    avg.update(scalar_net(3.0), 0.0)  # before swa_start: a copy (and the count restarts)
    assert weight(avg) == 3.0 and int(avg.n_averaged) == 1
    means = []
    for w in (6.0, 9.0, 12.0):
        avg.update(scalar_net(w), 1.0)
        means.append(weight(avg))
    assert means == pytest.approx([4.5, 6.0, 7.5], rel=1e-15)
    assert int(avg.n_averaged) == 4 and avg.count == 4


def test_ema_ramp_by_hand():
    avg = WeightAverage(scalar_net(10.0), "ramp")
    avg.update(scalar_net(0.0), 0.999)  # t = 0: d = 1/10
    assert weight(avg) == pytest.approx(1.0, rel=1e-15)
    avg.update(scalar_net(0.0), 0.999)  # t = 1: d = 2/11
    assert weight(avg) == pytest.approx(2 / 11, rel=1e-15)
    const = WeightAverage(scalar_net(10.0), "constant")
    const.update(scalar_net(0.0), 0.999)
    assert weight(const) == pytest.approx(9.99, rel=1e-15)


def test_constant_and_integer_buffers_are_copied_not_averaged():
    """Averaging the input normalisation (a non-persistent constant) would drift it by rounding (CIFAR-10's
    mean moves ~2e-6 in 2,000 updates at 0.999) although checkpoints never save it."""
    torch.manual_seed(0)
    net = models.build("cnn", num_classes=10, in_channels=3, image_size=8, mean=[0.4914, 0.4822, 0.4465],
                       std=[0.2471, 0.2435, 0.2616])
    avg = WeightAverage(net)
    bn = dict(net.named_modules())["net.1"]
    bn.num_batches_tracked.fill_(7)
    bn.running_mean.fill_(1.0)
    for _ in range(2000):
        avg.update(net, 0.999)
    assert torch.equal(avg.module.mean, net.mean) and torch.equal(avg.module.std, net.std)
    avg_bn = dict(avg.module.named_modules())["net.1"]
    assert int(avg_bn.num_batches_tracked) == 7
    assert 0.8 < float(avg_bn.running_mean[0]) < 1.0  # averaged: 1 - 0.999**2000 of the way from 0 to 1
    assert float(avg_bn.running_mean[0]) == pytest.approx(1 - 0.999**2000, rel=1e-4)


def test_is_an_averaged_model_whose_step_counter_is_saved_and_restored():
    nets = [scalar_net(w) for w in (1.0, 2.0, 4.0, 8.0, 16.0)]
    avg = WeightAverage(nets[0], "ramp")
    assert isinstance(avg, AveragedModel) and avg.use_buffers
    for net in nets[1:3]:
        avg.update(net, 0.999)
    state = avg.state_dict()
    assert set(state) == {"n_averaged", "module.weight"} and int(state["n_averaged"]) == 3
    resumed = WeightAverage(scalar_net(0.0), "ramp")
    resumed.load_state_dict(state)
    assert resumed.count == 3
    for net in nets[3:]:
        avg.update(net, 0.999)
        resumed.update(net, 0.999)
    assert weight(resumed) == weight(avg)  # bit for bit: the ramp continued where it stopped
    older = WeightAverage(scalar_net(0.0))  # a training state saved before: the module's state only
    older.load_state_dict({"weight": torch.tensor([[5.0]], dtype=torch.float64)})
    assert weight(older) == 5.0 and older.count == 1


THREAT = Threat("linf", 8 / 255, 2 / 255, 10)


class Plan:
    """The parts of CellSettings that rpat.recipes.epoch_plan reads."""

    def __init__(self, method, eps_warmup_epochs=0, weight_average=WeightAverageSettings()):
        from types import SimpleNamespace

        self.method = OBJECTIVES[method].defaults
        self.threat = THREAT
        self.train = SimpleNamespace(eps_warmup_epochs=eps_warmup_epochs, weight_average=weight_average)


def test_eps_ramp_scales_eps_not_the_step():
    assert [recipes.eps_scale(e, 5) for e in range(1, 8)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]
    assert recipes.eps_scale(1, 0) == 1.0
    obj = OBJECTIVES["pgd_at"]
    plans = [recipes.epoch_plan(obj, Plan("pgd_at", eps_warmup_epochs=4), e) for e in (1, 2, 4, 5)]
    assert [p.threat.eps for p in plans] == pytest.approx([2 / 255, 4 / 255, 8 / 255, 8 / 255], rel=1e-15)
    assert {p.threat.step for p in plans} == {2 / 255} and {p.threat.steps for p in plans} == {10}
    assert recipes.epoch_plan(obj, Plan("pgd_at"), 1).threat == THREAT


def test_average_decay_per_epoch_and_rule():
    ema = WeightAverageSettings(kind="ema", decay=0.99, warmup_epochs=2)
    swa = WeightAverageSettings(kind="swa", swa_start=3)
    assert [recipes.average_decay(ema, e) for e in (1, 2, 3)] == [0.0, 0.0, 0.99]
    assert [recipes.average_decay(swa, e) for e in (2, 3, 9)] == [0.0, 1.0, 1.0]
    assert recipes.average_rule(ema) == "ramp" and recipes.average_rule(swa) == "swa"
    assert recipes.average_rule(WeightAverageSettings(kind="ema", ramp=False)) == "constant"
    # off: a teacher's decay comes from its objective's plan, unramped (ReBAT's published update)
    assert recipes.average_rule(WeightAverageSettings()) == "constant"
    plan = recipes.epoch_plan(OBJECTIVES["trades"], Plan("trades", weight_average=ema), 3)
    assert plan.average_decay == 0.99 and plan.reg_active
    rebat = recipes.epoch_plan(OBJECTIVES["rebat"], Plan("rebat"), 106)
    assert (rebat.average_decay, rebat.reg_active) == (0.999, True)
    assert math.isclose(recipes.epoch_plan(OBJECTIVES["rebat"], Plan("rebat", 10), 2).threat.eps, 1.6 / 255)
