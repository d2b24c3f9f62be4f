"""The PGD engine (rpat/attacks.py; docs/faithfulness.md: "Training attacks", D8). CPU only, seeded, small."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rpat.attacks import cw_margin_loss, pgd, project, random_start, uniform_noise

NORMS = ["linf", "l2"]
INITS = ["uniform", "normal", "none"]
TOL = 1e-6
# (eps, step) per norm, the docs/faithfulness.md D9 defaults
BUDGET = {"linf": (8 / 255, 2 / 255), "l2": (128 / 255, 15 / 255)}


class SmallNet(nn.Module):
    """conv(3->4) - BN - ReLU - avgpool - linear(64 -> 3) on 3x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A SmallNet fitted (train mode, 30 Adam steps) to random labels, then put in eval mode: a low clean loss."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x, y


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _dist(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)


# ---------------------------------------------------------------------------------------------
# Output invariants


@pytest.mark.parametrize("steps", [0, 1, 5])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("norm", NORMS)
def test_output_in_ball_box_detached_same_shape(trained, norm, init, steps):
    model, x, y = trained
    eps, step = BUDGET[norm]
    # x near the box faces so the box clip is active
    x = x.clone()
    x[:, 0] = 0.0
    x[:, 1, :4] = 1.0
    xg = x.clone().requires_grad_(True)
    x_adv = pgd(model, xg, y, eps=eps, step=step, steps=steps, norm=norm, init=init,
                generator=torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape
    assert x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert bool((_dist(x_adv, x, norm) <= eps + TOL).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if steps > 0 or init != "none":
        assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("norm", NORMS)
def test_ball_and_box_for_every_inner_loss(trained, norm, loss):
    model, x, y = trained
    eps, step = 0.3, 0.2  # large steps: the projection does the work
    x_adv = pgd(model, x, y, eps=eps, step=step, steps=4, norm=norm, loss=loss, init="normal",
                generator=torch.Generator().manual_seed(2))
    assert bool((_dist(x_adv, x, norm) <= eps + TOL).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_steps_zero_init_none_returns_x(trained):
    model, x, y = trained
    for norm in NORMS:
        x_adv = pgd(model, x, y, eps=0.1, step=0.01, steps=0, norm=norm, init="none")
        assert torch.equal(x_adv, x)
        assert not x_adv.requires_grad


# ---------------------------------------------------------------------------------------------
# The attack works


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_raises_the_ce(trained, norm, init):
    model, x, y = trained
    eps, step = BUDGET[norm]
    clean = _ce(model, x, y)
    x_adv = pgd(model, x, y, eps=eps, step=step, steps=10, norm=norm, init=init,
                generator=torch.Generator().manual_seed(3))
    adv = _ce(model, x_adv, y)
    assert clean < 0.5  # the model fits its data
    assert adv > clean + 0.05 and adv > 3 * clean
    # and more steps than a random start alone
    start = random_start(x, eps, norm, init, torch.Generator().manual_seed(3))
    assert adv > _ce(model, start, y)


def test_cw_attack_raises_the_margin(trained):
    model, x, y = trained
    with torch.no_grad():
        before = cw_margin_loss(model(x), y).item()
    x_adv = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=10, loss="cw", init="none")
    with torch.no_grad():
        after = cw_margin_loss(model(x_adv), y).item()
    assert after > before


def test_kl_with_normal_init_needs_no_ref_logits(trained):
    # TRADES attack (docs/faithfulness.md "TRADES and MART attacks"): reference logits are computed inside (eval-mode BN), start x + 0.001 N(0, I).
    model, x, y = trained
    x_adv = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=5, norm="linf", loss="kl", init="normal",
                generator=torch.Generator().manual_seed(4))
    assert bool((_dist(x_adv, x, "linf") <= 8 / 255 + TOL).all())

    def kl(xp):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(xp), 1), F.softmax(model(x), 1), reduction="sum").item()

    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(random_start(x, 8 / 255, "linf", "normal", torch.Generator().manual_seed(4)), start)
    assert kl(x_adv) > kl(start) > 0.0
    # giving the same reference explicitly gives the same result
    with torch.no_grad():
        ref = model(x)
    x_adv2 = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=5, norm="linf", loss="kl", init="normal",
                 ref_logits=ref, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x_adv, x_adv2)


# ---------------------------------------------------------------------------------------------
# One step by hand (linear model, CE): grad_x CE = W^T (softmax(Wx) - e_y) / B


def test_one_step_by_hand():
    # z = W x, W = [[1, -1], [2, 1], [-1, 2]], x = [0.5, 0.25], y = 0:
    # z = [0.25, 1.25, 0]; p = softmax(z); g = W^T (p - e_0) (B = 1)
    Wl = [[1.0, -1.0], [2.0, 1.0], [-1.0, 2.0]]
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(Wl))
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = torch.tensor([[0.5, 0.25]]), torch.tensor([0])
    z = [0.25, 1.25, 0.0]
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    r = [p[0] - 1.0, p[1], p[2]]
    g = [sum(Wl[c][j] * r[c] for c in range(3)) for j in range(2)]
    # g_1 = (p0 - 1) + 2 p1 - p2 ; g_2 = -(p0 - 1) + p1 + 2 p2 > 0
    step, eps = 0.1, 0.3
    linf = [xj + step * math.copysign(1.0, gj) for xj, gj in zip([0.5, 0.25], g)]
    norm_g = math.hypot(*g)
    l2 = [xj + step * gj / norm_g for xj, gj in zip([0.5, 0.25], g)]
    out_linf = pgd(model, x, y, eps=eps, step=step, steps=1, norm="linf", init="none")
    out_l2 = pgd(model, x, y, eps=eps, step=step, steps=1, norm="l2", init="none")
    assert out_linf[0].tolist() == pytest.approx(linf, rel=1e-6)
    assert out_l2[0].tolist() == pytest.approx(l2, rel=1e-6)
    # a second linf step is clipped to the eps = 0.15 box around x
    out = pgd(model, x, y, eps=0.15, step=0.1, steps=2, norm="linf", init="none")
    assert (out - x).abs().max().item() == pytest.approx(0.15, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# BatchNorm mode policy


class ModeProbe(nn.Module):
    """Records the BN module's training flag at every forward call of the wrapped network."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.net.bn.training)
        return self.net(x)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("norm", NORMS)
def test_bn_eval_during_attack_mode_restored_stats_unchanged(norm, loss):
    torch.manual_seed(0)
    net = SmallNet()
    x, y = _data(8, seed=5)
    net.train()
    net(x)  # non-trivial running stats
    model = ModeProbe(net)
    model.train()
    before = _bn_state(net)
    pgd(model, x, y, eps=0.1, step=0.03, steps=3, norm=norm, loss=loss, bn="eval",
        generator=torch.Generator().manual_seed(0))
    assert model.seen and not any(model.seen)  # every attack forward ran in eval mode
    assert model.training and net.training and net.bn.training  # mode restored, every submodule
    after = _bn_state(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_bn_train_mode_restores_eval():
    torch.manual_seed(0)
    net = SmallNet()
    x, y = _data(8, seed=6)
    model = ModeProbe(net)
    model.eval()
    before = _bn_state(net)
    pgd(model, x, y, eps=0.1, step=0.03, steps=3, bn="train", generator=torch.Generator().manual_seed(0))
    assert model.seen and all(model.seen)  # attack forwards in train mode (ReBAT policy)
    assert not model.training and not net.training and not net.bn.training
    # train-mode forwards update the running statistics (so the eval test above is meaningful)
    assert not torch.equal(before["bn.running_mean"], net.bn.running_mean)


def test_bn_mode_restored_per_module():
    # A mixed state (model in train, BN frozen in eval) comes back exactly as it was.
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    net.bn.eval()
    x, y = _data(4, seed=7)
    for bn in ("eval", "train", "keep"):
        pgd(net, x, y, eps=0.1, step=0.03, steps=2, bn=bn, generator=torch.Generator().manual_seed(0))
        assert net.training and net.conv.training and not net.bn.training, bn


# ---------------------------------------------------------------------------------------------
# Parameter gradients are untouched (docs/faithfulness.md D8)


@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
def test_parameter_grads_untouched(trained, loss):
    model, x, y = trained
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    pgd(model, x, y, eps=0.1, step=0.03, steps=3, loss=loss, generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))
    for p in model.parameters():
        p.grad = None
    pgd(model, x, y, eps=0.1, step=0.03, steps=3, loss=loss, generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        assert p.grad is None


def test_requires_grad_flags_untouched(trained):
    model, x, y = trained
    flags = [p.requires_grad for p in model.parameters()]
    pgd(model, x, y, eps=0.1, step=0.03, steps=2)
    assert [p.requires_grad for p in model.parameters()] == flags


# ---------------------------------------------------------------------------------------------
# Pieces: CW margin, projection, argument checks, uniform noise, determinism


def test_cw_margin_loss_by_hand():
    # row 1: y = 0, z = [1, 3, 2]:   max_{j != 0} z_j - z_0 = 3 - 1 = 2
    # row 2: y = 0, z = [5, 0, -1]:  0 - 5 = -5
    # row 3: y = 2, z = [-1, 4, 4.5]: 4 - 4.5 = -0.5
    # mean = (2 - 5 - 0.5) / 3 = -7/6
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0], [-1.0, 4.0, 4.5]])
    y = torch.tensor([0, 0, 2])
    assert cw_margin_loss(logits, y).item() == pytest.approx(-7 / 6, rel=1e-6)
    assert cw_margin_loss(logits[:1], y[:1]).item() == pytest.approx(2.0, rel=1e-6)


def test_project_l2_far_point_lands_on_the_sphere():
    # x = 0.5 everywhere; x_adv - x = [0.3, 0.4, 0, 0] has norm 0.5; eps = 0.1 scales it by 0.2 -> [0.06, 0.08, 0, 0]
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    delta = torch.tensor([0.3, 0.4, 0.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2)
    out = project(x + delta, x, 0.1, "l2")
    assert (out - x).flatten().norm().item() == pytest.approx(0.1, rel=1e-12)
    assert (out - x).flatten().tolist() == pytest.approx([0.06, 0.08, 0.0, 0.0], rel=1e-12)
    # per sample: a second sample inside the ball is left alone
    x2 = torch.full((2, 4), 0.5, dtype=torch.float64)
    xa2 = x2 + torch.tensor([[0.3, 0.4, 0.0, 0.0], [0.03, 0.0, -0.04, 0.0]], dtype=torch.float64)
    out2 = project(xa2, x2, 0.1, "l2")
    assert (out2[0] - x2[0]).norm().item() == pytest.approx(0.1, rel=1e-12)
    assert torch.equal(out2[1], xa2[1])
    # linf: clip per coordinate, then the box
    out3 = project(torch.tensor([[0.9, 0.1, -0.5]]), torch.tensor([[0.5, 0.5, 0.05]]), 0.2, "linf")
    assert out3.tolist()[0] == pytest.approx([0.7, 0.3, 0.0], rel=1e-6)


def test_negative_arguments_raise(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=-0.1, step=0.01, steps=1)
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=0.1, step=-0.01, steps=1)
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=0.1, step=0.01, steps=-1)
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=0.1, step=0.01, steps=1, norm="l1")
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=0.1, step=0.01, steps=1, bn="frozen")


def test_uniform_noise_within_eps_and_box():
    x, _ = _data(32, seed=8)
    x[:8] = 0.0
    x[8:16] = 1.0
    eps = 8 / 255
    out = uniform_noise(x, eps, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert float((out - x).abs().max()) <= eps + TOL
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # really random: interior pixels move, spread over the whole interval
    d = (out - x)[16:]
    assert float(d.abs().max()) > 0.9 * eps and float(d.min()) < -0.9 * eps
    assert torch.equal(out, uniform_noise(x, eps, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("init", ["uniform", "normal"])
@pytest.mark.parametrize("norm", NORMS)
def test_same_generator_seed_same_result(trained, norm, init):
    model, x, y = trained
    eps, step = BUDGET[norm]

    def run(seed):
        return pgd(model, x, y, eps=eps, step=step, steps=3, norm=norm, init=init,
                   generator=torch.Generator().manual_seed(seed))

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("norm", NORMS)
def test_uniform_start_geometry(norm):
    # linf: delta ~ U[-eps, eps] then box; l2: towards a random image, norm min(eps, ||u - x||) before the box.
    x = torch.full((64, 3, 4, 4), 0.5)
    eps = BUDGET[norm][0]
    s = random_start(x, eps, norm, "uniform", torch.Generator().manual_seed(0))
    d = _dist(s, x, norm)
    assert bool((d <= eps + TOL).all())
    if norm == "l2":
        assert d.tolist() == pytest.approx([eps] * 64, rel=1e-5)  # ||u - x|| >> eps for 48-dim images
    else:
        assert float(d.min()) > 0.8 * eps


# ---------------------------------------------------------------------------------------------
# L2 constants of the published attacks (docs/faithfulness.md D18), by hand on a linear float64 model

from rpat.attacks import ADVERTORCH_L2, REBAT_L2, TRADES_L2, L2Rule  # noqa: E402

OLD_L2 = L2Rule(floor=1e-12)  # rpat's rule before D18: max(||g||, 1e-12), exact projection


def _linear(Wl):
    lin = nn.Linear(len(Wl[0]), len(Wl), bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(Wl, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin)


def _softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def _matvec_t(Wl, r):
    """W^T r."""
    return [sum(Wl[c][j] * r[c] for c in range(len(Wl))) for j in range(len(Wl[0]))]


def _published_l2_step(x, xa, g, step, eps, rule):
    """x' + step g / N(g), then the eps-ball rescale of the rule, then the box (pure Python)."""
    ng = math.sqrt(sum(v * v for v in g))
    denom = max(ng, rule.floor) if rule.floor > 0 else ng + rule.add
    xa = [a + step * v / denom for a, v in zip(xa, g)]
    d = [a - b for a, b in zip(xa, x)]
    nd = math.sqrt(sum(v * v for v in d))
    scale = (eps / (nd + 1e-7) if rule.renorm else eps / nd) if nd > eps else 1.0
    return [min(max(b + scale * v, 0.0), 1.0) for b, v in zip(x, d)]


# a 3-class linear map with tiny weights: the CE gradient's norm is ~1e-7, where the guards matter
TINY_W = [[1e-7, -2e-7, 0.5e-7, 1e-7], [-1e-7, 1e-7, 2e-7, 0.0], [0.5e-7, 0.0, -1e-7, 3e-7]]
X4 = [0.2, 0.4, 0.6, 0.8]


@pytest.mark.parametrize("eps", [1.0, 0.005], ids=["inside", "projected"])
@pytest.mark.parametrize("rule", [ADVERTORCH_L2, TRADES_L2, REBAT_L2, OLD_L2],
                         ids=["advertorch", "trades", "rebat", "old"])
def test_l2_step_and_projection_by_hand(rule, eps):
    # CE at x (init none, y = 1): g = W^T (softmax(W x) - e_1); ||g|| ~ 2e-7
    model = _linear(TINY_W)
    z = [sum(w * v for w, v in zip(row, X4)) for row in TINY_W]
    p = _softmax(z)
    g = _matvec_t(TINY_W, [p[0], p[1] - 1.0, p[2]])
    ng = math.sqrt(sum(v * v for v in g))
    assert 1e-7 < ng < 1e-6
    step = 0.1
    expected = _published_l2_step(X4, X4, g, step, eps, rule)
    x = torch.tensor([X4], dtype=torch.float64)
    out = pgd(model, x, torch.tensor([1]), eps=eps, step=step, steps=1, norm="l2", init="none", l2=rule)
    assert out[0].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the guards really differ here: advertorch's floor 1e-6 shortens the step ~4x, TRADES' 1e-8 by ~4 %
    name = {ADVERTORCH_L2: "advertorch", TRADES_L2: "trades", REBAT_L2: "rebat", OLD_L2: "old"}[rule]
    length = {"advertorch": step * ng / 1e-6, "trades": step * ng / (ng + 1e-8),
              "rebat": step * ng / (ng + 1e-10), "old": step}[name]
    assert 0.005 < length and (length < 0.099) is (name in ("advertorch", "trades"))
    if eps < length:  # projected onto the sphere, or just inside it with renorm's 1e-7
        length = eps * length / (length + 1e-7) if rule.renorm else eps
    assert float((out - x).norm()) == pytest.approx(length, rel=1e-9)


def test_trades_first_l2_step_from_its_tiny_start_matches_the_published_formula():
    # TRADES' start x + 0.001 N(0, I) makes the first KL gradient tiny, so its 1e-8 guard shortens the first
    # step visibly: rpat's rule before D18 (max(||g||, 1e-12)) took the full step, ~1e-2 per coordinate
    # further here (1e-3 to 3e-3 for a randomly initialised PreActResNet-18 on CIFAR-sized inputs).
    Wl = [[0.003, -0.002, 0.001, 0.002], [-0.001, 0.002, 0.003, 0.0], [0.002, 0.0, -0.001, 0.003]]
    model = _linear(Wl)
    x = torch.tensor([X4], dtype=torch.float64)
    start = random_start(x, 0.5, "l2", "normal", torch.Generator().manual_seed(0))[0].tolist()
    # sum-KL(softmax(W x) || softmax(W x')) has gradient W^T (softmax(W x') - softmax(W x)) in x'
    p0 = _softmax([sum(w * v for w, v in zip(row, X4)) for row in Wl])
    p1 = _softmax([sum(w * v for w, v in zip(row, start)) for row in Wl])
    g = _matvec_t(Wl, [a - b for a, b in zip(p1, p0)])
    ng = math.sqrt(sum(v * v for v in g))
    assert 1e-9 < ng < 1e-7  # ~1e-8: the guard is of the gradient's own size
    step, eps = 15 / 255, 0.5
    expected = _published_l2_step(X4, start, g, step, eps, TRADES_L2)

    def attack(rule):
        return pgd(model, x, torch.tensor([0]), eps=eps, step=step, steps=1, norm="l2", loss="kl", init="normal",
                   l2=rule, generator=torch.Generator().manual_seed(0))[0].tolist()

    # (the KL gradient is a difference of nearly equal softmaxes: float64 keeps ~8 digits of it)
    assert attack(TRADES_L2) == pytest.approx(expected, abs=1e-11)
    old = attack(OLD_L2)
    assert max(abs(a - b) for a, b in zip(old, expected)) > 5e-3  # the difference D18 removed


def test_renorm_projection_scale_is_eps_over_norm_plus_1e_7():
    # delta = [0.3, 0.4] (norm 0.5) shrinks by 0.1 / (0.5 + 1e-7) with renorm, by exactly 0.2 without;
    # a delta inside the ball is left alone by both
    x = torch.full((2, 2), 0.5, dtype=torch.float64)
    delta = torch.tensor([[0.3, 0.4], [0.03, -0.04]], dtype=torch.float64)
    for rule, scale in ((TRADES_L2, 0.1 / (0.5 + 1e-7)), (ADVERTORCH_L2, 0.2)):
        out = project(x + delta, x, 0.1, "l2", l2=rule) - x
        assert out[0].tolist() == pytest.approx([0.3 * scale, 0.4 * scale], rel=1e-12)
        assert out[1].tolist() == pytest.approx([0.03, -0.04], rel=1e-12)
    assert float((project(x + delta, x, 0.1, "l2", l2=TRADES_L2) - x)[0].norm()) < 0.1


def test_each_training_attack_uses_its_published_l2_constants():
    from rpat.objectives import baselines
    assert baselines.pgd_attack.keywords.get("l2", ADVERTORCH_L2) is ADVERTORCH_L2
    assert baselines.pgd_attack.keywords["box_first"] is True
    assert baselines.trades_attack.keywords["l2"] is TRADES_L2
    assert baselines.mart_attack.keywords["l2"] is TRADES_L2
    assert (TRADES_L2.add, TRADES_L2.renorm, REBAT_L2.add, REBAT_L2.renorm) == (1e-8, True, 1e-10, True)
    assert (ADVERTORCH_L2.floor, ADVERTORCH_L2.renorm) == (1e-6, False)
    with pytest.raises(ValueError):
        L2Rule()  # no guard: a zero gradient would divide by zero
