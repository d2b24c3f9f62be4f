"""ReBAT and RPAT++ (docs/faithfulness.md: "ReBAT and RPAT++", "ReBAT attack", D3, D4, D8, D10, D12) checked against hand values.

Expected numbers are computed WITHOUT torch and without rpat: plain Python floats and ``math``, the formulas of
docs/faithfulness.md "ReBAT and RPAT++" written out term by term. Models are tiny bias-free maps in float64:

* student ``PowNet(W, 1)``: z(x) = W x (linear), so its logits are obvious;
* teacher ``PowNet(V, 3)``: w(x) = V (x ** 3) (cubic), so w(x_mid) - r w(x) depends on *which* end of the segment
  r weights, and on the clean input x, not only on x'.

Epochs are 1-based in rpat (the reference's 0-based epoch e is rpat's epoch e + 1): ReBAT's warm-up epoch 105 is
rpat's ``warmup_epoch`` 106, the stronger attack's stage1 100 is rpat's ``start_epoch`` 101.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rpat import attacks
from handcalc import PowNet, Recorder, t, lab, val, h_logits, h_softmax, h_ce
from rpat.averaging import WeightAverage
from rpat.objectives import OBJECTIVES, _guard_huge, compute_loss, rebat_attack, rebat_loss, rpat_plus_plus_loss
from rpat.objectives import StepContext, constant_plan
from rpat.settings import Threat

REL = 1e-9
REBAT = OBJECTIVES["rebat"]


# ---------------------------------------------------------------------------------------------
# Hand side


def h_kl_bm_logits(P_logits, Q_logits):
    """KL_bm(softmax(p) || softmax(q)) = (1/B) sum_i sum_c p_ic (log p_ic - log q_ic), terms with p = 0 give 0."""
    out = 0.0
    for pz, qz in zip(P_logits, Q_logits):
        p, q = h_softmax(pz), h_softmax(qz)
        out += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)
    return out / len(P_logits)


def h_scale(Z, s):
    return [[s * v for v in row] for row in Z]


def h_sub(A, B):
    return [[u - v for u, v in zip(a, b)] for a, b in zip(A, B)]


def h_rebat(W, V, XA, Y, beta):
    """docs/faithfulness.md "ReBAT and RPAT++" (ReBAT): CE(z(x'), y) + beta KL_bm(softmax(w(x')) || softmax(z(x')))."""
    Za = h_logits(W, XA, 1)
    ce = h_ce(Za, Y)
    kl = h_kl_bm_logits(h_logits(V, XA, 3), Za)
    return {"ce": ce, "rebat_kl": kl, "rebat_kl_weighted": beta * kl, "total": ce + beta * kl}


def h_rpat_pp(W, V, X, XA, Y, lam, r):
    """rpat's RPAT++ with r = clean_weight:
        CE(z(x'), y) + lam KL_bm( softmax(w(x_mid) - r w(x)) || softmax((1-r) z(x')) ),  x_mid = r x + (1-r) x'."""
    Za = h_logits(W, XA, 1)
    ce = h_ce(Za, Y)
    Xmid = [[r * a + (1 - r) * b for a, b in zip(xr, xar)] for xr, xar in zip(X, XA)]
    target = h_sub(h_logits(V, Xmid, 3), h_scale(h_logits(V, X, 3), r))
    term = h_kl_bm_logits(target, h_scale(Za, 1 - r))
    return {"ce": ce, "rpat": term, "rpat_weighted": lam * term, "total": ce + lam * term}


def h_rpat_pp_reference_form(W, V, X, XA, a):
    """The reference's (train_cifar_ra.py) form with its `interpolation_rate` a = weight of delta:
        u = w(x), v = w(x + a delta), R = KL_bm( softmax(v - (1-a) u) || softmax(a z(x')) ).
    Mapping to rpat's clean_weight r: a = 1 - r, so x + a delta = r x + (1-r) x' = x_mid, (1-a) u = r w(x),
    a z(x') = (1-r) z(x'). At r = a = 0.5 the two conventions coincide."""
    Xa = [[xv + a * (xav - xv) for xv, xav in zip(xr, xar)] for xr, xar in zip(X, XA)]
    target = h_sub(h_logits(V, Xa, 3), h_scale(h_logits(V, X, 3), 1 - a))
    return h_kl_bm_logits(target, h_scale(h_logits(W, XA, 1), a))


# ---------------------------------------------------------------------------------------------
# Fixed data: 3 classes, 2 features, inputs on a 1/4 grid

W = [[1.0, -1.0], [2.0, 1.0], [-1.0, 2.0]]  # student
V = [[2.0, 1.0], [-1.0, 3.0], [1.0, -2.0]]  # teacher (cubic)
X = [[0.5, 0.25], [1.0, 0.0], [0.25, 0.75]]
XA = [[0.75, 0.0], [0.5, 0.25], [0.5, 0.5]]
Y = [0, 1, 2]


def nets():
    return PowNet(W, 1), PowNet(V, 3)


def test_hand_helpers_on_closed_forms():
    # z(x'_1) = W [0.75, 0] = [0.75, 1.5, -0.75]; w(x'_1) = V [0.421875, 0] = [0.84375, -0.421875, 0.421875]
    assert h_logits(W, XA[:1], 1) == [[0.75, 1.5, -0.75]]
    assert h_logits(V, XA[:1], 3) == [[0.84375, -0.421875, 0.421875]]
    assert PowNet(W, 1)(t(XA[:1])).tolist() == [[0.75, 1.5, -0.75]]
    assert PowNet(V, 3)(t(XA[:1])).tolist() == [[0.84375, -0.421875, 0.421875]]
    # KL(softmax([1,0,0]) || softmax([0,1,0])) = (e-1)/(e+2) (p1 log(p1/q1) = e/(e+2) * 1, p2 log(p2/q2) = -1/(e+2))
    e = math.e
    assert h_kl_bm_logits([[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]) == pytest.approx((e - 1) / (e + 2), rel=1e-12)
    # The reference form with a = 1 - r equals rpat's form (up to rounding of x_mid).
    for r in (0.5, 0.3, 0.8):
        ours = h_rpat_pp(W, V, X, XA, Y, 1.0, r)["rpat"]
        assert h_rpat_pp_reference_form(W, V, X, XA, 1 - r) == pytest.approx(ours, rel=1e-12)
    # ... and the swapped reading (a = r) is a different number away from 0.5, so the tests below pin the convention.
    assert abs(h_rpat_pp_reference_form(W, V, X, XA, 0.3) - h_rpat_pp(W, V, X, XA, Y, 1.0, 0.3)["rpat"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# ReBAT (docs/faithfulness.md "ReBAT and RPAT++" step 5, first bullet)


def test_rebat_defaults_match_reference_in_one_based_epochs():
    d = REBAT.defaults
    assert REBAT.uses_teacher is True and REBAT.supports_rpat is True and REBAT.rpat_loss is rpat_plus_plus_loss
    assert d["beta"] == 1.0 and d["decay"] == 0.999 and d["attack_bn"] == "train"
    assert d["warmup_epoch"] == 106  # reference: epoch >= 105, 0-based
    s = d["stronger_attack"]
    assert s == {"enabled": False, "eps": 10 / 255, "steps": 12, "start_epoch": 101}  # reference: e >= stage1 = 100


def test_rebat_closed_form_one_sample():
    # One-hot input x' = e_1 picks column 1: z(x') = [0, 1, 0], w(x') = [1, 0, 0] (w cubic: 1**3 = 1).
    # CE(z, 0) = log(e^0 + e^1 + e^0) - 0 = log(e + 2); KL(softmax([1,0,0]) || softmax([0,1,0])) = (e-1)/(e+2).
    student, teacher = PowNet([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]], 1), PowNet([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], 3)
    x, xa, y = t([[0.0, 1.0]]), t([[1.0, 0.0]]), lab([0])
    e = math.e
    for beta in (1.0, 2.5):
        loss, parts = compute_loss(REBAT, student, x, y, xa, hp={"beta": beta}, teacher=teacher)
        assert val(parts["ce"]) == pytest.approx(math.log(e + 2), rel=1e-12)
        assert val(parts["rebat_kl"]) == pytest.approx((e - 1) / (e + 2), rel=1e-12)
        assert val(loss) == pytest.approx(math.log(e + 2) + beta * (e - 1) / (e + 2), rel=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0, 0.0])
def test_rebat_loss_matches_hand_value(beta):
    student, teacher = nets()
    expected = h_rebat(W, V, XA, Y, beta)
    assert expected["rebat_kl"] > 1e-2
    loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), hp={"beta": beta}, teacher=teacher)
    assert set(parts) == set(expected)
    for key, value in expected.items():
        assert val(parts[key]) == pytest.approx(value, rel=REL, abs=1e-15), key
    assert parts["total"] is loss
    # the function itself (hp with beta given explicitly, reg_active defaulting to on)
    out = rebat_loss(student, t(X), lab(Y), t(XA), {"beta": beta}, StepContext(teacher=teacher))
    assert set(out.parts) == {"ce", "rebat_kl", "rebat_kl_weighted"}
    assert val(out.loss) == pytest.approx(expected["total"], rel=REL)
    assert torch.equal(out.logits["adv"], student(t(XA)))


def test_rebat_default_beta_is_one_and_beta_scales_linearly():
    student, teacher = nets()
    l1, p1 = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher)
    l3, p3 = compute_loss(REBAT, student, t(X), lab(Y), t(XA), hp={"beta": 3.0}, teacher=teacher)
    assert val(p1["rebat_kl_weighted"]) == pytest.approx(val(p1["rebat_kl"]), rel=1e-15)
    assert val(p3["rebat_kl"]) == pytest.approx(val(p1["rebat_kl"]), rel=1e-15)  # unweighted part independent of beta
    assert val(p3["rebat_kl_weighted"]) == pytest.approx(3.0 * val(p1["rebat_kl"]), rel=1e-12)
    assert val(l3) - val(p3["ce"]) == pytest.approx(3.0 * (val(l1) - val(p1["ce"])), rel=1e-9)


def test_rebat_reg_inactive_is_ce_only_and_skips_the_teacher():
    student = PowNet(W, 1)
    teacher = Recorder(PowNet(V, 3))
    out = rebat_loss(student, t(X), lab(Y), t(XA), {"beta": 1.0}, StepContext(teacher=teacher, reg_active=False))
    assert set(out.parts) == {"ce"}
    ce = h_ce(h_logits(W, XA, 1), Y)
    assert val(out.loss) == pytest.approx(ce, rel=REL)
    loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher, reg_active=False)
    assert set(parts) == {"ce", "total"}
    assert val(loss) == pytest.approx(ce, rel=REL)
    assert teacher.inputs == []


def test_rebat_forwards_and_gradients():
    student, teacher = Recorder(PowNet(W, 1)), Recorder(PowNet(V, 3))
    loss, _ = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher)
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], t(XA))
    assert len(teacher.inputs) == 1 and torch.equal(teacher.inputs[0], t(XA))  # teacher sees x', never x
    loss.backward()
    assert teacher.model.linear.weight.requires_grad  # only no_grad protects it
    assert teacher.model.linear.weight.grad is None
    g = student.model.linear.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # the KL term contributes to the student's gradient (teacher side has none)
    s2 = PowNet(W, 1)
    compute_loss(REBAT, s2, t(X), lab(Y), t(XA), teacher=teacher, reg_active=False)[0].backward()
    assert not torch.allclose(g, s2.linear.weight.grad)


def test_rebat_with_weight_average_teacher_gets_no_gradient():
    student = PowNet(W, 1)
    wa = WeightAverage(PowNet(V, 3))
    loss, _ = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=wa)
    assert val(loss) == pytest.approx(h_rebat(W, V, XA, Y, 1.0)["total"], rel=REL)
    loss.backward()
    assert all(p.grad is None for p in wa.parameters())
    assert student.linear.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# RPAT++ (docs/faithfulness.md "ReBAT and RPAT++" step 5, second bullet; docs/faithfulness.md D3)
#
# rpat's `clean_weight` r weights the CLEAN end (docs/faithfulness.md D1): x_mid = r x + (1-r) x'. The reference
# (train_cifar_ra.py) writes RPAT++ with the weight of delta, a = `interpolation_rate`: teacher input x + a*delta,
# target w(x + a delta) - (1-a) w(x), student a*z(x'). With a = 1 - r: x + a delta = x_mid, (1-a) w(x) = r w(x),
# a z(x') = (1-r) z(x'). The reference hard-codes a = 0.5 (= r = 0.5, where both readings agree); r = 0.3 pins
# the convention (it corresponds to the reference's a = 0.7).


@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("r", [0.5, 0.3])
def test_rpat_plus_plus_matches_hand_value(r, lam):
    student, teacher = nets()
    expected = h_rpat_pp(W, V, X, XA, Y, lam, r)
    assert expected["rpat"] > 1e-3
    loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher,
                               rpat={"weight": lam, "clean_weight": r})
    # replaces the ReBAT KL term: no rebat_kl part, and the total has no BoAT contribution
    assert set(parts) == {"ce", "rpat", "rpat_weighted", "total"}
    for key, value in expected.items():
        assert val(parts[key]) == pytest.approx(value, rel=REL, abs=1e-15), key
    assert parts["total"] is loss
    # reference form with a = 1 - r
    assert val(parts["rpat"]) == pytest.approx(h_rpat_pp_reference_form(W, V, X, XA, 1 - r), rel=REL)
    # not ReBAT + RPAT: the BoAT term would add beta * rebat_kl
    boat = h_rebat(W, V, XA, Y, 1.0)["rebat_kl"]
    assert val(loss) != pytest.approx(expected["total"] + boat, rel=1e-6)


def test_rpat_plus_plus_convention_r_weights_the_clean_end():
    student, teacher = nets()
    _, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher,
                            rpat={"weight": 1.0, "clean_weight": 0.3})
    swapped = h_rpat_pp_reference_form(W, V, X, XA, 0.3)  # a = r: the other reading of "0.3"
    assert abs(val(parts["rpat"]) - swapped) > 1e-3


def test_rpat_plus_plus_defaults_r_half_lambda_one_and_ignores_beta():
    student, teacher = nets()
    expected = h_rpat_pp(W, V, X, XA, Y, 1.0, 0.5)
    for hp in ({}, {"beta": 7.0}):  # ReBAT beta and RPAT lambda are separate keys
        loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), hp=hp, rpat={}, teacher=teacher)
        assert val(loss) == pytest.approx(expected["total"], rel=REL)
        assert val(parts["rpat_weighted"]) == pytest.approx(expected["rpat"], rel=REL)


def test_rpat_plus_plus_closed_form_linear_teacher_r_half():
    # Linear teacher: w(x_mid) - r w(x) = (1-r) w(x'). With x' = e_1, z(x') = [0, 1, 0], w(x') = [1, 0, 0], r = 1/2:
    # R = KL(softmax([1/2, 0, 0]) || softmax([0, 1/2, 0])) = (1/2)(s - 1)/(s + 2), s = e^(1/2).
    student, teacher = PowNet([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]], 1), PowNet([[1.0, 3.0], [0.0, -1.0], [0.0, 1.0]], 1)
    x, xa, y = t([[0.0, 1.0]]), t([[1.0, 0.0]]), lab([1])
    s = math.exp(0.5)
    loss, parts = compute_loss(REBAT, student, x, y, xa, teacher=teacher, rpat={"weight": 2.0})
    assert val(parts["rpat"]) == pytest.approx(0.5 * (s - 1) / (s + 2), rel=1e-12)
    ce = math.log(math.e + 2) - 1.0  # CE([0, 1, 0], y = 1)
    assert val(loss) == pytest.approx(ce + 2.0 * 0.5 * (s - 1) / (s + 2), rel=1e-12)


def test_rpat_plus_plus_reg_inactive_is_ce_only():
    student, teacher = PowNet(W, 1), Recorder(PowNet(V, 3))
    loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=teacher, reg_active=False,
                               rpat={"weight": 2.0, "clean_weight": 0.3})
    assert set(parts) == {"ce", "total"}
    assert val(loss) == pytest.approx(h_ce(h_logits(W, XA, 1), Y), rel=REL)
    assert teacher.inputs == []


@pytest.mark.parametrize("r", [0.5, 0.3])
def test_rpat_plus_plus_forwards_and_gradients(r):
    student, teacher = Recorder(PowNet(W, 1)), Recorder(PowNet(V, 3))
    x, xa = t(X), t(XA)
    loss, _ = compute_loss(REBAT, student, x, lab(Y), xa, teacher=teacher, rpat={"clean_weight": r})
    assert len(student.inputs) == 1 and torch.equal(student.inputs[0], xa)
    assert len(teacher.inputs) == 2
    assert torch.equal(teacher.inputs[0], x)  # u = w(x) first
    assert torch.equal(teacher.inputs[1], r * x + (1 - r) * xa)  # then v = w(x_mid)
    loss.backward()
    assert teacher.model.linear.weight.grad is None
    g = student.model.linear.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    s2 = PowNet(W, 1)
    compute_loss(REBAT, s2, x, lab(Y), xa, teacher=teacher, reg_active=False,
                 rpat={"clean_weight": r})[0].backward()
    assert not torch.allclose(g, s2.linear.weight.grad)  # the RPAT++ term reaches the student


# ---------------------------------------------------------------------------------------------
# The huge-regulariser guard (docs/faithfulness.md D3: an error, not silently dropped)


def test_guard_huge_direct():
    loss = torch.tensor(1.25, dtype=torch.float64)
    for reg in (0.0, 3.0, 9.999e9):
        out = _guard_huge(loss, torch.tensor(reg, dtype=torch.float64))
        assert torch.equal(out, loss)
    for reg in (1e10, 2e10, float("inf"), float("nan")):
        assert torch.isnan(_guard_huge(loss, torch.tensor(reg, dtype=torch.float64)))


def _huge_pair(scale):
    # Student logits z(x') = [scale, -scale, 0] with y = 0: CE ~ 0. Teacher w(x') = [0, 1, 0] (linear, one-hot x'):
    # softmax(w) = [1, e, 1]/(e+2) and log softmax(z) ~ [0, -2 scale, -scale], so KL_bm ~ scale (2e+1)/(e+2) ~ 1.37 scale
    # (RPAT++ at r = 1/2: target [0, 1/2, 0], student [scale, -scale, 0]/2, R ~ 0.55 scale).
    student = PowNet([[scale, 0.0], [-scale, 0.0], [0.0, 0.0]], 1)
    teacher = PowNet([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], 1)
    return student, teacher, t([[0.0, 0.0]]), t([[1.0, 0.0]]), lab([0])


@pytest.mark.parametrize("rpat", [None, {"weight": 1.0, "clean_weight": 0.5}])
def test_huge_regulariser_turns_loss_into_nan(rpat):
    student, teacher, x, xa, y = _huge_pair(1e11)
    loss, parts = compute_loss(REBAT, student, x, y, xa, teacher=teacher, rpat=rpat)
    reg = parts["rpat" if rpat else "rebat_kl"]
    assert val(reg) >= 1e10
    assert math.isnan(val(loss))
    assert math.isnan(val(parts["total"]))


@pytest.mark.parametrize("rpat", [None, {"weight": 1.0, "clean_weight": 0.5}])
def test_large_but_allowed_regulariser_is_kept(rpat):
    student, teacher, x, xa, y = _huge_pair(1e6)
    loss, parts = compute_loss(REBAT, student, x, y, xa, teacher=teacher, rpat=rpat)
    reg = parts["rpat" if rpat else "rebat_kl"]
    assert 1e5 < val(reg) < 1e10
    assert val(loss) == pytest.approx(val(parts["ce"]) + val(reg), rel=1e-12)


@pytest.mark.parametrize("rpat", [None, {"weight": 1.0, "clean_weight": 0.5}])
def test_nan_regulariser_gives_nan_loss(rpat):
    student = PowNet(W, 1)

    def nan_teacher(inp):
        return torch.full((inp.shape[0], 3), float("nan"), dtype=torch.float64)

    loss, parts = compute_loss(REBAT, student, t(X), lab(Y), t(XA), teacher=nan_teacher, rpat=rpat)
    assert math.isfinite(val(parts["ce"]))
    assert math.isnan(val(loss))


# ---------------------------------------------------------------------------------------------
# The ReBAT attack (docs/faithfulness.md "ReBAT attack"): train-mode BatchNorm by default, 'ball' random start


def bn_net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Linear(4, 3, bias=False)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(4, 8, generator=gen, dtype=torch.float64))
        net[4].weight.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    return net


def batch(B=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 8, generator=gen, dtype=torch.float64)
    x[0, :4] = 0.0  # box edges are active
    x[1, 4:] = 1.0
    y = torch.randint(0, 3, (B,), generator=gen)
    return x, y


THREATS = [Threat("linf", 8 / 255, 2 / 255, 4), Threat("l2", 0.5, 0.125, 4)]


@pytest.mark.parametrize("start_training", [False, True])
def test_rebat_attack_uses_train_mode_bn_and_restores_mode(start_training):
    net = bn_net()
    net.train(start_training)
    x, y = batch()
    threat = THREATS[0]
    out = rebat_attack(net, x, y, threat, dict(REBAT.defaults), generator=torch.Generator().manual_seed(2))
    bn = net[2]
    assert all(m.training is start_training for m in net.modules())
    # one train-mode forward per step (ball start: none) and the final one (D17)
    assert int(bn.num_batches_tracked) == threat.steps + 1
    assert float(bn.running_mean.abs().sum()) > 0  # started at zeros
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert out.shape == x.shape and not out.requires_grad
    # docs/faithfulness.md D8: attack steps leave no parameter gradients
    assert all(p.grad is None for p in net.parameters())
    # hp without 'attack_bn' also means train mode
    net2 = bn_net()
    net2.eval()
    rebat_attack(net2, x, y, threat, {}, generator=torch.Generator().manual_seed(2))
    assert int(net2[2].num_batches_tracked) == threat.steps + 1 and not net2.training


def test_rebat_attack_eval_bn_is_configurable():
    net = bn_net()
    net.train()
    x, y = batch()
    rebat_attack(net, x, y, THREATS[0], {"attack_bn": "eval"}, generator=torch.Generator().manual_seed(2))
    bn = net[2]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(4, dtype=torch.float64))
    assert net.training


@pytest.mark.parametrize("threat", THREATS, ids=["linf", "l2"])
def test_rebat_attack_requests_ball_start(threat, monkeypatch):
    calls = []
    original = attacks.random_start

    def spy(x, eps, norm, init, generator=None):
        calls.append((eps, norm, init))
        return original(x, eps, norm, init, generator)

    monkeypatch.setattr(attacks, "random_start", spy)
    x, y = batch()
    rebat_attack(bn_net(), x, y, threat, {}, generator=torch.Generator().manual_seed(3))
    assert calls == [(threat.eps, threat.norm, "ball")]


def test_rebat_l2_start_is_uniform_radius_inside_the_ball():
    # steps = 0 returns the random start. x = 0.5 and eps = 0.2 keep every coordinate off the box, so
    # ||delta|| / eps is exactly ReBAT's radius u ~ U(0, 1) (not ||delta|| = eps as in advertorch's L2 start).
    B, eps = 400, 0.2
    x = torch.full((B, 8), 0.5, dtype=torch.float64)
    y = torch.zeros(B, dtype=torch.long)
    out = rebat_attack(bn_net(), x, y, Threat("l2", eps, 0.05, 0), {},
                       generator=torch.Generator().manual_seed(4))
    radius = (out - x).norm(dim=1) / eps
    assert float(radius.max()) <= 1 + 1e-12
    assert float(radius.min()) < 0.05
    assert 0.44 < float(radius.mean()) < 0.56  # E[U(0,1)] = 1/2
    assert float((radius < 0.5).double().mean()) == pytest.approx(0.5, abs=0.07)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_rebat_linf_start_is_uniform_in_the_box():
    B, eps = 200, 0.1
    x = torch.full((B, 8), 0.5, dtype=torch.float64)
    out = rebat_attack(bn_net(), x, torch.zeros(B, dtype=torch.long), Threat("linf", eps, 0.05, 0), {},
                       generator=torch.Generator().manual_seed(5))
    d = out - x
    assert float(d.abs().max()) <= eps + 1e-15
    assert float(d.abs().max()) > 0.95 * eps and abs(float(d.mean())) < 0.01


@pytest.mark.parametrize("threat", THREATS, ids=["linf", "l2"])
def test_rebat_attack_output_in_ball_and_box(threat):
    x, y = batch(B=32, seed=6)
    net = bn_net(7)
    out = rebat_attack(net, x, y, threat, dict(REBAT.defaults), generator=torch.Generator().manual_seed(8))
    d = out - x
    if threat.norm == "linf":
        assert float(d.abs().max()) <= threat.eps + 1e-12
    else:
        assert float(d.norm(dim=1).max()) <= threat.eps + 1e-12
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(d.abs().max()) > 0
    # deterministic given the generator
    net2 = bn_net(7)
    out2 = rebat_attack(net2, x, y, threat, dict(REBAT.defaults), generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, out2)


# ---------------------------------------------------------------------------------------------
# Weight averaging (docs/faithfulness.md "Weight averaging")


def wa_net(W1, gamma, b):
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        net[0].weight.copy_(t(W1))
        net[1].weight.copy_(torch.tensor(gamma, dtype=torch.float64))
        net[1].bias.copy_(torch.tensor(b, dtype=torch.float64))
    return net


def set_bn_stats(net, mean, var, n):
    bn = net[1]
    bn.running_mean.copy_(torch.tensor(mean, dtype=torch.float64))
    bn.running_var.copy_(torch.tensor(var, dtype=torch.float64))
    bn.num_batches_tracked.fill_(n)


OLD = dict(W1=[[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]], gamma=[1.0, 2.0, 3.0], b=[0.0, -1.0, 2.0])
NEW = dict(W1=[[5.0, 2.0], [-3.0, 8.0], [7.0, 0.0]], gamma=[2.0, -2.0, 1.0], b=[4.0, 1.0, -6.0])
OLD_STATS = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
NEW_STATS = ([1.0, -2.0, 3.0], [4.0, 0.5, 8.0], 7)


def flat(d):
    return d["W1"][0] + d["W1"][1] + d["W1"][2] + d["gamma"] + d["b"]


def wa_params(avg):
    return [v for p in avg.module.parameters() for v in p.detach().flatten().tolist()]


def test_weight_average_starts_as_frozen_copy():
    net = wa_net(**OLD)
    avg = WeightAverage(net)
    assert all(not p.requires_grad for p in avg.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert wa_params(avg) == flat(OLD)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert wa_params(avg) == flat(OLD)  # an independent copy
    x = t([[0.5, 0.25], [1.0, 0.0]])
    avg.eval()
    net.eval()
    with torch.no_grad():
        net[0].weight.sub_(1.0)
        assert torch.equal(avg(x), net(x))


def test_weight_average_decay_zero_is_exact_copy():
    avg = WeightAverage(wa_net(**OLD))
    net = wa_net(**NEW)
    set_bn_stats(net, *NEW_STATS)
    avg.update(net, decay=0.0)
    for (name, a), b in zip(avg.module.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(not p.requires_grad for p in avg.parameters())


@pytest.mark.parametrize("d", [0.75, 0.999])
def test_weight_average_update_by_hand(d):
    avg = WeightAverage(wa_net(**OLD))
    set_bn_stats(avg.module, *OLD_STATS)
    net = wa_net(**NEW)
    set_bn_stats(net, *NEW_STATS)
    avg.update(net, decay=d)
    expected = [d * o + (1 - d) * n for o, n in zip(flat(OLD), flat(NEW))]
    rel = 0.0 if d == 0.75 else 1e-12  # dyadic values with d = 3/4 are exact
    for got, exp in zip(wa_params(avg), expected):
        assert got == pytest.approx(exp, rel=rel, abs=1e-15 if rel else 0.0)
    bn = avg.module[1]
    for got, o, n in zip(bn.running_mean.tolist(), OLD_STATS[0], NEW_STATS[0]):
        assert got == pytest.approx(d * o + (1 - d) * n, rel=rel, abs=1e-15 if rel else 0.0)
    for got, o, n in zip(bn.running_var.tolist(), OLD_STATS[1], NEW_STATS[1]):
        assert got == pytest.approx(d * o + (1 - d) * n, rel=rel, abs=1e-15 if rel else 0.0)
    assert int(bn.num_batches_tracked) == 7  # copied, not averaged
    assert bn.num_batches_tracked.dtype == torch.long
    # the online model is untouched
    assert [v for p in net.parameters() for v in p.detach().flatten().tolist()] == flat(NEW)
    # a second update compounds: old2 = d * avg1 + (1 - d) * new
    avg.update(net, decay=d)
    expected2 = [d * a + (1 - d) * n for a, n in zip(expected, flat(NEW))]
    for got, exp in zip(wa_params(avg), expected2):
        assert got == pytest.approx(exp, rel=1e-12, abs=1e-15)
    assert all(not p.requires_grad for p in avg.parameters())


# ---------------------------------------------------------------------------------------------
# Per-epoch settings (docs/faithfulness.md "ReBAT and RPAT++" "Per epoch" and step 3, in 1-based epochs)

THREAT = Threat("linf", 8 / 255, 2 / 255, 10)


def hp_with(**kw):
    return {**REBAT.defaults, **kw}


def test_epoch_plan_warmup_gates_regulariser_and_decay():
    hp = hp_with(warmup_epoch=5, decay=0.9)
    for epoch in (1, 4):
        plan = REBAT.epoch_plan(hp, THREAT, epoch)
        assert plan.reg_active is False and plan.average_decay == 0.0
        assert plan.threat == THREAT
    for epoch in (5, 6, 50):
        plan = REBAT.epoch_plan(hp, THREAT, epoch)
        assert plan.reg_active is True and plan.average_decay == 0.9
    assert hp == hp_with(warmup_epoch=5, decay=0.9)  # the input is not mutated


def test_epoch_plan_reference_defaults():
    # The published code: d = 0.999 and beta on for 0-based epoch >= 105, i.e. rpat epoch >= 106.
    hp = hp_with()
    plan = REBAT.epoch_plan(hp, THREAT, 105)
    assert (plan.reg_active, plan.average_decay) == (False, 0.0)
    plan = REBAT.epoch_plan(hp, THREAT, 106)
    assert (plan.reg_active, plan.average_decay) == (True, 0.999)
    # stronger attack disabled by default: the threat never changes
    for epoch in (1, 101, 200):
        assert REBAT.epoch_plan(hp, THREAT, epoch).threat == THREAT


def test_epoch_plan_stronger_attack():
    strong = {"enabled": True, "eps": 10 / 255, "steps": 12, "start_epoch": 101}
    hp = hp_with(stronger_attack=strong)
    assert REBAT.epoch_plan(hp, THREAT, 100).threat == THREAT
    for epoch in (101, 150):
        after = REBAT.epoch_plan(hp, THREAT, epoch).threat
        assert after == Threat("linf", 10 / 255, 2 / 255, 12)  # same step and norm
    assert THREAT == Threat("linf", 8 / 255, 2 / 255, 10)  # not mutated
    off = hp_with(stronger_attack={**strong, "enabled": False})
    for epoch in (100, 101, 150):
        assert REBAT.epoch_plan(off, THREAT, epoch).threat == THREAT


def test_methods_without_a_plan_keep_their_threat_and_no_average():
    for name, obj in OBJECTIVES.items():
        if obj.epoch_plan is constant_plan:
            for epoch in (1, 106, 200):
                plan = obj.epoch_plan(obj.defaults, THREAT, epoch)
                assert (plan.threat, plan.reg_active, plan.average_decay) == (THREAT, True, 0.0)
    assert OBJECTIVES["pgd_at"].epoch_plan is constant_plan and OBJECTIVES["pgd_at"].after_step is None


# ---------------------------------------------------------------------------------------------
# The published attack's extra forwards (docs/faithfulness.md D17): BatchNorm running statistics only


def bn_first_net(seed=0):
    """BatchNorm straight on the flattened input, so its running statistics are plain moments of the input."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    with torch.no_grad():
        net[2].weight.copy_(torch.randn(3, 8, generator=gen, dtype=torch.float64))
        net[2].bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    return net


def bn_stats(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("threat", THREATS, ids=["linf", "l2"])
def test_final_forward_is_one_more_momentum_update_with_the_final_x_adv(threat):
    x, y = batch()
    runs = {}
    for final in (False, True):
        net = bn_first_net()
        net.train()
        out = rebat_attack(net, x, y, threat, {**REBAT.defaults, "final_forward": final},
                           generator=torch.Generator().manual_seed(2))
        runs[final] = (out, bn_stats(net))
    (out0, s0), (out1, s1) = runs[False], runs[True]
    assert torch.equal(out0, out1)  # the same x'
    assert int(s0["1.num_batches_tracked"]) == threat.steps and int(s1["1.num_batches_tracked"]) == threat.steps + 1
    # by hand: m <- 0.9 m + 0.1 mean_B(x'), v <- 0.9 v + 0.1 var_B(x') (unbiased), BatchNorm's momentum 0.1
    rows = out1.tolist()
    B = len(rows)
    mean = [sum(r[j] for r in rows) / B for j in range(8)]
    var = [sum((r[j] - mean[j]) ** 2 for r in rows) / (B - 1) for j in range(8)]
    for key, moment in (("1.running_mean", mean), ("1.running_var", var)):
        expected = [0.9 * a + 0.1 * b for a, b in zip(s0[key].tolist(), moment)]
        assert s1[key].tolist() == pytest.approx(expected, rel=1e-12)


def _rebat_step(final_forward, replay=False, decay=0.5):
    """One ReBAT step (regulariser and averaging on) from a fixed state, by train_step or, with ``replay``,
    written out forward by forward with the final attack forward made explicitly."""
    from rpat import train
    from rpat.objectives import EpochPlan

    net = bn_net(3)
    net.train()
    avg = WeightAverage(bn_net(4)).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(seed=9)
    hp = {**REBAT.defaults, "final_forward": final_forward and not replay}
    plan = EpochPlan(THREATS[0], reg_active=True, average_decay=decay)
    torch.manual_seed(5)  # the attack's random start (train_step passes no generator)
    if not replay:
        train.train_step(REBAT, net, opt, x, y, plan, hp, None, average=avg)
        return net, avg
    x_adv = rebat_attack(net, x, y, plan.threat, hp)
    with torch.no_grad():
        net(x_adv)  # the published restart selection's forward, in train mode
    loss, _ = compute_loss(REBAT, net, x, y, x_adv, hp, teacher=avg, reg_active=True)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        net(x)  # the published logging-only clean forward
    avg.update(net, decay)
    return net, avg


def test_one_rebat_step_with_final_forward_equals_the_replayed_forwards():
    net, avg = _rebat_step(True)
    net_r, avg_r = _rebat_step(True, replay=True)
    for a, b in ((net, net_r), (avg.module, avg_r.module)):
        for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), k


def test_final_forward_changes_running_statistics_only():
    decay = 0.5
    on, avg_on = _rebat_step(True, decay=decay)
    off, avg_off = _rebat_step(False, decay=decay)
    for (name, p), q in zip(on.named_parameters(), off.parameters()):
        assert torch.equal(p, q), name  # the extra forward changes no loss and no gradient
    s_on, s_off = bn_stats(on), bn_stats(off)
    assert int(s_on["2.num_batches_tracked"]) == int(s_off["2.num_batches_tracked"]) + 1
    d_model = s_on["2.running_mean"] - s_off["2.running_mean"]
    assert float(d_model.abs().max()) > 1e-3
    # the teacher's statistics follow through the average: (1 - d) times the model's difference
    d_teacher = bn_stats(avg_on.module)["2.running_mean"] - bn_stats(avg_off.module)["2.running_mean"]
    assert d_teacher.tolist() == pytest.approx(((1 - decay) * d_model).tolist(), rel=1e-9, abs=1e-15)


def test_cutmix_targets_make_two_forwards_per_attack_step():
    # With probability targets (CutMix) the published attack calls the network twice per step: same x',
    # one more running-statistics update per step unless cutmix_double_forward is off.
    x, _ = batch()
    soft = torch.softmax(torch.randn(len(x), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    threat = THREATS[1]
    outs = {}
    for double in (False, True):
        net = bn_first_net()
        net.train()
        outs[double] = rebat_attack(net, x, soft, threat, {**REBAT.defaults, "cutmix_double_forward": double},
                                    generator=torch.Generator().manual_seed(2))
        assert int(net[1].num_batches_tracked) == (2 if double else 1) * threat.steps + 1
        assert net.training and all(p.grad is None for p in net.parameters())
    assert torch.equal(outs[False], outs[True])


# ---------------------------------------------------------------------------------------------
# The teacher's BatchNorm mode in its first averaging epoch (docs/faithfulness.md D19)


@pytest.mark.parametrize("mode", ["eval", "train", "train_and_resume"])
def test_epoch_plan_teacher_bn_mode(mode):
    hp = hp_with(warmup_epoch=3, teacher_bn_first_epoch=mode)
    plans = {(e, r): REBAT.epoch_plan(hp, THREAT, e, resumed=r).average_bn for e in range(1, 6) for r in (False, True)}
    first = "eval" if mode == "eval" else "train"
    expected = {(e, r): "eval" for e in range(1, 6) for r in (False, True)}
    expected[3, False] = expected[3, True] = first  # the first averaging epoch
    if mode == "train_and_resume":
        expected[4, True] = expected[5, True] = "train"  # the first epoch after a resume, once averaging is on
    assert plans == expected
    assert REBAT.epoch_plan(hp_with(warmup_epoch=0, teacher_bn_first_epoch=mode), THREAT, 1).average_bn == first
    assert constant_plan({}, THREAT, 1, resumed=True).average_bn == "eval"


def test_teacher_in_train_mode_uses_batch_statistics_and_nudges_its_running_statistics():
    # ReBAT's teacher sees x' (no gradient). In train mode its BatchNorm moves its running mean by
    # 0.1 (mean_B(x') - m) before the average update: m_WA <- d (0.9 m + 0.1 mean_B(x')) + (1 - d) m_model.
    from rpat import train
    from rpat.objectives import EpochPlan

    x, y = batch(seed=9)
    decay = 0.5
    out = {}
    for teacher_train in (False, True):
        net, avg = bn_first_net(3), WeightAverage(bn_first_net(4))
        with torch.no_grad():
            avg.module[1].running_mean.fill_(0.25)
        avg.train(teacher_train)
        seen = []
        avg.register_forward_hook(lambda mod, inp, o: seen.append(inp[0].clone()))
        torch.manual_seed(5)
        train.train_step(REBAT, net, torch.optim.SGD(net.parameters(), lr=0.1), x, y,
                         EpochPlan(THREATS[0], reg_active=True, average_decay=decay), dict(REBAT.defaults), None,
                         average=avg)
        assert len(seen) == 1 and avg.training is teacher_train
        out[teacher_train] = (seen[0], net[1].running_mean.tolist(), avg.module[1].running_mean.tolist())
    x_adv, model_mean, teacher_mean = out[True]
    batch_mean = x_adv.mean(0).tolist()
    expected = [decay * (0.9 * 0.25 + 0.1 * b) + (1 - decay) * m for b, m in zip(batch_mean, model_mean)]
    assert teacher_mean == pytest.approx(expected, rel=1e-12)
    _, model_mean_eval, teacher_mean_eval = out[False]
    assert teacher_mean_eval == pytest.approx([decay * 0.25 + (1 - decay) * m for m in model_mean_eval], rel=1e-12)


REBAT_TINY = {
    "experiment": "unit", "tracking": {"enabled": False},
    "grid": [{"dataset": ["digits"], "model": ["cnn"], "norm": ["linf"], "method": ["rebat"], "rpat": [False, True],
              "seed": [0]}],
    "data": {"val_size": 64, "train_subset": 128, "augment": "none", "batch_size": 64},
    "threat": {"linf": {"eps": 0.2, "step": 0.1, "steps": 2}},
    "train": {"epochs": 3, "lr": 0.05, "schedule": {"name": "constant"}, "val_attack_steps": 1},
    "methods": {"rebat": {"warmup_epoch": 2, "decay": 0.5}},
    "eval": {"n_examples": 16, "autoattack": {"enabled": False}},
}


def _teacher_modes(monkeypatch, tmp_path, mode, rpat, epochs=3, die_at_validation=None):
    """The BatchNorm mode of every teacher call while a tiny ReBAT cell trains (2 steps per epoch)."""
    from rpat import accuracy, config, train

    raw = {**REBAT_TINY, "train": {**REBAT_TINY["train"], "epochs": epochs},
           "methods": {"rebat": {**REBAT_TINY["methods"]["rebat"], "teacher_bn_first_epoch": mode}}}
    cfg = config.from_dict(raw)
    cell = config.Cell("digits", "cnn", "linf", "rebat", rpat, 0)
    modes = []
    monkeypatch.setattr(WeightAverage, "forward", lambda self, x: (modes.append(self.training), self.module(x))[1])
    if die_at_validation:
        real, calls = accuracy.accuracies, []

        def dies(*args, **kwargs):
            calls.append(1)
            if len(calls) == die_at_validation:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(accuracy, "accuracies", dies)
        with pytest.raises(KeyboardInterrupt):
            train.train_cell(cfg, cell, tmp_path)
        monkeypatch.setattr(accuracy, "accuracies", real)
        modes.clear()
    train.train_cell(cfg, cell, tmp_path)
    return modes


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("rpat", [False, True], ids=["rebat", "rpat++"])
def test_training_loop_sets_the_teacher_mode_per_epoch(monkeypatch, tmp_path, mode, rpat):
    # warm-up epoch 2 of 3, two steps per epoch; ReBAT calls the teacher once per step, RPAT++ twice
    per_epoch = 2 * (2 if rpat else 1)
    assert _teacher_modes(monkeypatch, tmp_path, mode, rpat) == [mode == "train"] * per_epoch + [False] * per_epoch


@pytest.mark.parametrize("mode", ["train", "train_and_resume"])
def test_teacher_mode_after_a_resume(monkeypatch, tmp_path, mode):
    # killed in epoch 3's validation of 4: the job resumes at epoch 3, where only train_and_resume
    # (the published code after --resume) puts the teacher in train mode again
    modes = _teacher_modes(monkeypatch, tmp_path, mode, False, epochs=4, die_at_validation=3)
    assert modes == [mode == "train_and_resume"] * 2 + [False] * 2


def test_teacher_bn_first_epoch_takes_only_known_values():
    from rpat import config
    from rpat.errors import ConfigError

    raw = {**REBAT_TINY, "methods": {"rebat": {"teacher_bn_first_epoch": "batch"}}}
    with pytest.raises(ConfigError, match="teacher_bn_first_epoch.*eval, train, train_and_resume"):
        config.from_dict(raw)


# ---------------------------------------------------------------------------------------------
# One published --beta, two rpat keys (docs/faithfulness.md D4): ReBAT's beta = RPAT++'s weight in every shipped
# config where a block pairs ReBAT with its RPAT++ twin (same dataset, model, norm and seed)


def beta_weight_mismatches(cfg) -> list[str]:
    """Each ReBAT cell whose methods.rebat.beta differs from its RPAT++ twin's rpat.weight."""
    from dataclasses import replace

    cells = set(cfg.cells())
    out = []
    for cell in cfg.cells():
        twin = replace(cell, rpat=True)
        if cell.method != "rebat" or cell.rpat or twin not in cells:
            continue
        beta, weight = cfg.settings(cell).method["beta"], cfg.settings(twin).rpat.weight
        if beta != weight:
            out.append(f"{cell.id}: methods.rebat.beta = {beta} but {twin.id} has rpat.weight = {weight}")
    return out


def test_shipped_configs_give_rebat_and_rpat_plus_plus_the_same_beta():
    from pathlib import Path

    from rpat import config

    paths = sorted((Path(__file__).resolve().parents[1] / "config").glob("*.yaml"))
    checked = 0
    for path in paths:
        cfg = config.load(path)
        assert beta_weight_mismatches(cfg) == [], path.name
        checked += sum(c.method == "rebat" for c in cfg.cells())
    assert checked >= 10  # paper.yaml alone has 10 ReBAT/RPAT++ cells
    paper = config.load(paths[0].parent / "paper.yaml")
    wrn = paper.settings(config.Cell("cifar10", "wrn34_10", "linf", "rebat", True, 0))
    assert (wrn.method["beta"], wrn.rpat.weight, wrn.train.schedule["factor"], wrn.data.cutmix.enabled) == \
        (2.0, 2.0, 4.0, True)


@pytest.mark.parametrize("set_", [{"methods": {"rebat": {"beta": 2.0}}}, {"rpat": {"weight": 2.0}},
                                  {"methods": {"rebat": {"beta": 2.0}}, "rpat": {"weight": 2.0}}],
                         ids=["beta-only", "weight-only", "both"])
def test_a_block_setting_one_of_beta_and_weight_is_caught(set_):
    from rpat import config

    raw = {**REBAT_TINY, "grid": [{**REBAT_TINY["grid"][0], "set": set_}]}
    found = beta_weight_mismatches(config.from_dict(raw))
    assert len(found) == (0 if len(set_) == 2 else 1)
    if found:
        assert "digits/cnn/linf/rebat/seed0: methods.rebat.beta = " in found[0]
