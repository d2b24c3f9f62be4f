"""Adversarial weight perturbation (rpat/awp.py): one step of a linear model derived by hand, the layer-wise
scaling, what is perturbed and what is not, and the order of operations inside train_step."""

import copy
import math

import pytest
import torch
from torch import nn

from rpat import train
from rpat.awp import WeightPerturbation, layer_perturbation, perturbed_names
from rpat.objectives import EpochPlan, Objective, StepContext
from rpat.objectives.baselines import adversarial_ce_loss, trades_loss
from rpat.settings import Threat

XA = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # the adversarial example, fixed
Y = torch.tensor([0])
PLAN = EpochPlan(Threat("linf", 0.1, 0.1, 1))


def linear(W, b=(0.0, 0.0)) -> nn.Linear:
    net = nn.Linear(2, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(W, dtype=torch.float64))
        net.bias.copy_(torch.tensor(b, dtype=torch.float64))
    return net


def fixed_attack(model, x, y, threat, hp, generator=None):
    return XA


FIXED = Objective("fixed_pgd_at", "CE on a fixed x'", fixed_attack, adversarial_ce_loss, supports_awp=True)


def test_layer_perturbation_by_hand():
    v = layer_perturbation(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]]))  # ||w|| = 5, ||g|| = 2
    assert v.tolist() == [[0.0, 5.0]]
    assert layer_perturbation(torch.ones(2, 2), torch.zeros(2, 2)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_one_awp_step_of_a_linear_model_by_hand():
    """z = W x' + b, W = [[1, 1], [1, 1]], b = 0, x' = (1, 0), y = 0, gamma = 0.01, SGD lr 0.5.

    Ascent: p = softmax(z) = (1/2, 1/2), g_W = (p - e_0) x'^T = [[-1/2, 0], [1/2, 0]], ||g_W|| = 1/sqrt 2,
    ||W|| = 2, v = 2 sqrt 2 g_W = [[-sqrt 2, 0], [sqrt 2, 0]]; b (one dimension) is not perturbed.
    Perturbed: z = (1 - a, 1 + a) with a = 0.01 sqrt 2; loss CE = log(1 + e^{2a}); q = sigmoid(2a).
    Step on the perturbed weights: grad_W = [[-q, 0], [q, 0]], grad_b = (-q, q); removing gamma v leaves
    W = [[1 + lr q, 1], [1 - lr q, 1]], b = (lr q, -lr q): the plain step's 1/2 is replaced by q.
    """
    net = linear([[1.0, 1.0], [1.0, 1.0]])
    awp = WeightPerturbation(net, adversarial_ce_loss, gamma=0.01)
    assert perturbed_names(net) == ["weight"]
    v = awp.direction(XA, Y, XA, {}, StepContext())  # x unused by the adversarial CE
    s2 = math.sqrt(2.0)
    assert v[0].flatten().tolist() == pytest.approx([-s2, 0.0, s2, 0.0], rel=1e-15)
    assert net.weight.grad is None and awp.proxy.weight.grad is None  # nothing accumulated anywhere

    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss, _ = train.train_step(FIXED, net, opt, XA, Y, PLAN, {}, None, awp=awp)
    a = 0.01 * s2
    q = 1.0 / (1.0 + math.exp(-2 * a))
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(2 * a)), rel=1e-14)
    assert net.weight.flatten().tolist() == pytest.approx([1 + 0.5 * q, 1.0, 1 - 0.5 * q, 1.0], rel=1e-15)
    assert net.bias.tolist() == pytest.approx([0.5 * q, -0.5 * q], rel=1e-14)

    plain = linear([[1.0, 1.0], [1.0, 1.0]])
    train.train_step(FIXED, plain, torch.optim.SGD(plain.parameters(), lr=0.5), XA, Y, PLAN, {}, None)
    assert plain.weight.tolist() == [[1.25, 1.0], [0.75, 1.0]]  # q = 1/2 without AWP


def test_each_layer_is_scaled_to_its_own_norm_and_batchnorm_is_left_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    x = torch.rand(8, 4, dtype=torch.float64)
    x_adv, y = (x + 0.1).clamp(0, 1), torch.arange(8) % 3
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    awp = WeightPerturbation(net, trades_loss, gamma=0.005)
    assert perturbed_names(net) == ["0.weight", "3.weight"]  # BatchNorm's weight and the biases have one dimension
    v = awp.direction(x, y, x_adv, {"beta": 6.0}, StepContext())
    # the ascent ran on the proxy in train mode: the model's BatchNorm statistics did not move
    for k, val in stats.items():
        assert torch.equal(net.state_dict()[k], val), k
    ref = copy.deepcopy(net)
    loss = trades_loss(ref, x, y, x_adv, {"beta": 6.0}).loss
    grads = torch.autograd.grad(loss, [ref[0].weight, ref[3].weight])
    for w, g, d in zip((net[0].weight, net[3].weight), grads, v):
        assert float(d.norm()) == pytest.approx(float(w.detach().norm()), rel=1e-12)  # ||v_l|| = ||w_l||
        assert float(torch.nn.functional.cosine_similarity(d.flatten(), g.flatten(), dim=0)) == pytest.approx(1.0)
    before = [w.clone() for w in awp.weights]
    awp.perturb(v)
    assert torch.allclose(net[0].weight, before[0] + 0.005 * v[0], rtol=0, atol=1e-15)
    awp.restore(v)
    assert all(torch.allclose(w, b, rtol=0, atol=1e-15) for w, b in zip(awp.weights, before))


def test_warmup_counts_epochs_without_awp():
    awp = WeightPerturbation(linear([[1.0, 0.0], [0.0, 1.0]]), adversarial_ce_loss, gamma=5e-3, warmup=9)
    assert [awp.active(e) for e in (1, 9, 10, 11)] == [False, False, True, True]
