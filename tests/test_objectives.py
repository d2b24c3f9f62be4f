"""Objective losses checked against values derived by hand (docs/faithfulness.md: "What the published code does", D1-D5).

Every expected number here is computed WITHOUT torch and without rpat: plain Python floats and the ``math``
module, following the formulas of docs/faithfulness.md "What the published code does" written out term by term. The models are tiny
bias-free maps whose logits are obvious:

* ``PowNet(W, p)``: z(x) = W (x ** p) on the flattened input (elementwise power). p = 1 is linear
  (the RPAT term is exactly 0), p = 3 makes the RPAT term non-zero and asymmetric in r <-> 1-r, which
  pins which end of the segment ``clean_weight`` weights.
* one-hot inputs through a linear map: z(e_k) = column k of W ("table model"), to place logits
  exactly where a formula's constants matter (MART, the JS clamp).

Everything runs in float64, so ``rel=1e-6`` leaves a wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rpat.objectives import OBJECTIVES, compute_loss, interpolate, rpat_term
from handcalc import PowNet, Recorder, t, lab, val, h_logits, h_softmax, h_ce

REL = 1e-6
# Every registered objective that trains (pretrained loads its weights) without a teacher (those have
# tests/test_rebat.py): registering one makes the tests below ask for its hand-derived values.
BASELINES = [n for n, o in OBJECTIVES.items() if not o.uses_teacher and o.provide is None]
WITH_RPAT = [n for n in BASELINES if OBJECTIVES[n].supports_rpat]


# ---------------------------------------------------------------------------------------------
# Hand side: the formulas of docs/faithfulness.md "What the published code does" on plain floats


def h_kl_bm(P, Q):
    """(1/B) sum_i sum_c p_ic (log p_ic - log q_ic) on probability rows; terms with p = 0 contribute 0."""
    return sum(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pr, qr) if p > 0) for pr, qr in zip(P, Q)) / len(P)


def h_mse(A, B):
    """Mean over all B x C elements."""
    n = sum(len(a) for a in A)
    return sum((u - v) ** 2 for a, b in zip(A, B) for u, v in zip(a, b)) / n


def h_mix(A, B, r):
    """r * A + (1 - r) * B elementwise (rows of equal length)."""
    return [[r * u + (1 - r) * v for u, v in zip(a, b)] for a, b in zip(A, B)]


def h_rpat_closed_form(W, X, XA, r):
    """RPAT term for the cubic model z = W x^3, derived in closed form.

    Per feature j with a = x_j (clean), b = x'_j (adversarial) and x_mid = r a + (1-r) b:
        (r a + (1-r) b)^3 - r a^3 - (1-r) b^3 = -r (1-r) (a-b)^2 ((1+r) a + (2-r) b)
    (both sides are cubic in (a, b), vanish to second order at a = b, and agree at (1, 0): r - r^3 = r(1-r)(1+r)
    and at (0, 1): (1-r) - (1-r)^3 = r(1-r)(2-r)). So z(x_mid) - [r z(x) + (1-r) z(x')] = W h with
    h_j = -r (1-r) (a_j - b_j)^2 ((1+r) a_j + (2-r) b_j), and the term is mean_{i,c} (W h_i)_c^2.
    Swapping the convention (r on the adversarial end) turns (1+r, 2-r) into (2-r, 1+r): different unless r = 1/2.
    """
    H = [[-r * (1 - r) * (a - b) ** 2 * ((1 + r) * a + (2 - r) * b) for a, b in zip(xr, xar)] for xr, xar in zip(X, XA)]
    D = h_logits(W, H, 1)
    return sum(d * d for row in D for d in row) / sum(len(row) for row in D), H


def h_rpat_direct(W, X, XA, r, power):
    """MSE(z(r x + (1-r) x'), r z(x) + (1-r) z(x')) straight from docs/faithfulness.md D1."""
    z_mid = h_logits(W, h_mix(X, XA, r), power)
    target = h_mix(h_logits(W, X, power), h_logits(W, XA, power), r)
    return h_mse(z_mid, target)


def h_mart(Zn, Za, Y, beta):
    """docs/faithfulness.md "MART", written out per example."""
    B = len(Y)
    bce = rob = 0.0
    for zn, za, y in zip(Zn, Za, Y):
        pa, pn = h_softmax(za), h_softmax(zn)
        order = sorted(range(len(pa)), key=lambda c: -pa[c])
        y2 = order[1] if order[0] == y else order[0]  # runner-up rule
        bce += -math.log(1.0001 - pa[y2] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pn, pa) if p > 0)
        rob += kl * (1.0000001 - pn[y])
    ce = h_ce(Za, Y)
    return {"ce": ce, "mart_bce": bce / B, "mart_kl": rob / B, "mart_kl_weighted": beta * rob / B,
            "total": ce + bce / B + beta * rob / B}


def h_js(Z1, Z2, T):
    """0.5 [KL_bm(p || m) + KL_bm(q || m)], p = softmax(z1/T), q = softmax(z2/T), m = max((p+q)/2, 1e-8)."""
    B = len(Z1)
    out = 0.0
    for z1, z2 in zip(Z1, Z2):
        p, q = h_softmax(z1, T), h_softmax(z2, T)
        m = [max((u + v) / 2, 1e-8) for u, v in zip(p, q)]
        out += sum(u * (math.log(u) - math.log(w)) for u, w in zip(p, m) if u > 0)
        out += sum(v * (math.log(v) - math.log(w)) for v, w in zip(q, m) if v > 0)
    return 0.5 * out / B


def h_expected(name, W, X, XA, Y, power, hp, rpat):
    """Expected parts dict of compute_loss (docs/faithfulness.md: the objectives' sections, D1, D4, D5)."""
    Zc, Za = h_logits(W, X, power), h_logits(W, XA, power)
    if name == "ce":
        parts = {"ce": h_ce(Zc, Y)}
        parts["total"] = parts["ce"]
    elif name in ("noise", "pgd_at"):
        parts = {"ce": h_ce(Za, Y)}
        parts["total"] = parts["ce"]
    elif name == "trades":
        beta = hp.get("beta", 6.0)
        ce = h_ce(Zc, Y)
        kl = h_kl_bm([h_softmax(z) for z in Zc], [h_softmax(z) for z in Za])
        parts = {"ce": ce, "trades_kl": kl, "trades_kl_weighted": beta * kl, "total": ce + beta * kl}
    elif name == "mart":
        parts = h_mart(Zc, Za, Y, hp.get("beta", 6.0))
    elif name == "consistency":
        w, T = hp.get("weight", 1.0), hp.get("temperature", 0.5)
        B = len(Y) // 2
        ce = h_ce(Za, Y)  # mean over the 2B rows, labels [y; y]
        js = h_js(Za[:B], Za[B:], T)  # first B rows = view 1, last B rows = view 2
        parts = {"ce": ce, "consistency_js": js, "consistency_js_weighted": w * js, "total": ce + w * js}
    else:
        raise KeyError(name)
    if rpat is not None:
        r, lam = rpat.get("clean_weight", 0.5), rpat.get("weight", 1.0)
        term = h_rpat_direct(W, X, XA, r, power)
        parts["rpat"] = term
        parts["rpat_weighted"] = lam * term
        parts["total"] += lam * term
    return parts


# ---------------------------------------------------------------------------------------------
# Fixed data: 3 classes, 2 features, inputs on a 1/4 grid

W = [[1.0, -1.0], [2.0, 1.0], [-1.0, 2.0]]
X4 = [[0.5, 0.25], [1.0, 0.0], [0.25, 0.75], [0.0, 0.5]]
XA4 = [[0.75, 0.0], [0.5, 0.25], [0.5, 0.5], [0.25, 0.25]]
Y2 = [0, 1]


def data_for(name):
    """(X, X_adv, Y): B = 2 for the single-view objectives; Consistency gets [x1; x2] (4 rows) and [y; y]."""
    if name == "consistency":
        return X4, XA4, Y2 + Y2
    return X4[:2], XA4[:2], Y2


def test_registry_and_rpat_support():
    assert BASELINES == ["ce", "noise", "pgd_at", "trades", "mart", "consistency"]
    assert OBJECTIVES["ce"].supports_rpat is False
    for name in WITH_RPAT:
        assert OBJECTIVES[name].supports_rpat is True
    assert OBJECTIVES["consistency"].views == 2
    assert OBJECTIVES["trades"].defaults["beta"] == 6.0
    assert OBJECTIVES["mart"].defaults["beta"] == 6.0
    assert OBJECTIVES["consistency"].defaults == {"weight": 1.0, "temperature": 0.5}


def test_models_compute_the_hand_logits():
    # Linear: z(x_1) = W [0.5, 0.25] = [0.5 - 0.25, 1 + 0.25, -0.5 + 0.5] = [0.25, 1.25, 0.0]
    #         z(x_2) = W [1, 0]      = [1, 2, -1]
    assert PowNet(W, 1)(t(X4[:2])).tolist() == [[0.25, 1.25, 0.0], [1.0, 2.0, -1.0]]
    assert h_logits(W, X4[:2], 1) == [[0.25, 1.25, 0.0], [1.0, 2.0, -1.0]]
    # Cubic: x_1^3 = [0.125, 0.015625] -> [0.109375, 0.265625, -0.09375]
    assert PowNet(W, 3)(t(X4[:1])).tolist() == [[0.109375, 0.265625, -0.09375]]
    assert h_logits(W, X4[:1], 3) == [[0.109375, 0.265625, -0.09375]]


def test_hand_helpers_on_closed_forms():
    # CE of equal logits is log C; CE of [0, log 2, log 3]... wrt label 2 is log(6/3) = log 2.
    assert h_ce([[0.0, 0.0, 0.0]], [1]) == pytest.approx(math.log(3), rel=1e-12)
    assert h_ce([[0.0, math.log(2), math.log(3)]], [2]) == pytest.approx(math.log(2), rel=1e-12)
    # KL between identical distributions is 0; KL([1/2,1/2] || [1/4,3/4]) = 0.5 log 2 + 0.5 log(2/3).
    assert h_kl_bm([[0.5, 0.5]], [[0.5, 0.5]]) == 0.0
    assert h_kl_bm([[0.5, 0.5]], [[0.25, 0.75]]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    # The closed form of the cubic RPAT term agrees with the direct definition.
    for r in (0.5, 0.25, 0.75):
        assert h_rpat_closed_form(W, X4, XA4, r)[0] == pytest.approx(h_rpat_direct(W, X4, XA4, r, 3), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Every baseline, RPAT off and on


RPAT_CASES = [
    pytest.param(None, id="rpat-off"),
    pytest.param({"weight": 1.0, "clean_weight": 0.5}, id="rpat-r0.5"),
    pytest.param({"weight": 2.0, "clean_weight": 0.25}, id="rpat-lam2-r0.25"),
]


# (name, rpat) for every baseline with RPAT off, and on where supported ("ce" with RPAT: see the ValueError test)
NAME_RPAT = [pytest.param(n, c.values[0], id=f"{n}-{c.id}") for n in BASELINES for c in RPAT_CASES
             if n in WITH_RPAT or c.values[0] is None]


@pytest.mark.parametrize("power", [1, 3])
@pytest.mark.parametrize("name,rpat", NAME_RPAT)
def test_loss_matches_hand_value(name, power, rpat):
    X, XA, Y = data_for(name)
    loss, parts = compute_loss(OBJECTIVES[name], PowNet(W, power), t(X), lab(Y), t(XA), hp=None, rpat=rpat)
    expected = h_expected(name, W, X, XA, Y, power, {}, rpat)
    assert set(parts) == set(expected)
    for key, value in expected.items():
        assert val(parts[key]) == pytest.approx(value, rel=REL, abs=1e-15), key
    assert parts["total"] is loss
    assert val(loss) == pytest.approx(expected["total"], rel=REL)


def test_part_names():
    base = {
        "ce": {"ce"},
        "noise": {"ce"},
        "pgd_at": {"ce"},
        "trades": {"ce", "trades_kl", "trades_kl_weighted"},
        "mart": {"ce", "mart_bce", "mart_kl", "mart_kl_weighted"},
        "consistency": {"ce", "consistency_js", "consistency_js_weighted"},
    }
    for name in BASELINES:
        X, XA, Y = data_for(name)
        loss, parts = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA))
        assert set(parts) == base[name] | {"total"}, name
        assert torch.equal(parts["total"], loss)
        if name != "ce":
            loss, parts = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA), rpat={})
            assert set(parts) == base[name] | {"total", "rpat", "rpat_weighted"}, name
            assert torch.equal(parts["total"], loss)


# ---------------------------------------------------------------------------------------------
# The RPAT term (docs/faithfulness.md D1)


@pytest.mark.parametrize("r", [0.5, 0.25])
@pytest.mark.parametrize("name", WITH_RPAT)
def test_rpat_term_closed_form_and_clean_end_convention(name, r):
    X, XA, Y = data_for(name)
    _, parts = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA), rpat={"clean_weight": r})
    expected, _ = h_rpat_closed_form(W, X, XA, r)
    assert expected > 1e-6
    assert val(parts["rpat"]) == pytest.approx(expected, rel=REL)
    # default weight lambda = 1
    assert val(parts["rpat_weighted"]) == pytest.approx(expected, rel=REL)
    if r != 0.5:
        # r weights the CLEAN end: the swapped convention (x_mid = (1-r) x + r x', target (1-r) z(x) + r z(x'))
        # is the closed form with x and x' exchanged; at r = 0.25 it is a different number.
        swapped, _ = h_rpat_closed_form(W, XA, X, r)
        assert abs(swapped - expected) > 1e-3 * expected
        assert val(parts["rpat"]) != pytest.approx(swapped, rel=1e-3)


def test_rpat_hand_numbers_r_half():
    # Written out for the PGD-AT data (rows x_1 = [0.5, 0.25], x'_1 = [0.75, 0], x_2 = [1, 0], x'_2 = [0.5, 0.25]), r = 1/2:
    # h_j = -(1/4)(a-b)^2 (1.5 a + 1.5 b)
    #   row 1: j=1: -(1/4)(1/16)(1.875) = -0.029296875 ; j=2: -(1/4)(1/16)(0.375) = -0.005859375
    #   row 2: j=1: -(1/4)(1/4)(2.25)   = -0.140625    ; j=2: -(1/4)(1/16)(0.375) = -0.005859375
    # W h: row 1 = [-0.0234375, -0.064453125, 0.017578125]; row 2 = [-0.134765625, -0.287109375, 0.12890625]
    h = [[-0.029296875, -0.005859375], [-0.140625, -0.005859375]]
    assert h_rpat_closed_form(W, X4[:2], XA4[:2], 0.5)[1] == h
    d = [[-0.0234375, -0.064453125, 0.017578125], [-0.134765625, -0.287109375, 0.12890625]]
    expected = sum(v * v for row in d for v in row) / 6
    _, parts = compute_loss(OBJECTIVES["pgd_at"], PowNet(W, 3), t(X4[:2]), lab(Y2), t(XA4[:2]), rpat={})
    assert val(parts["rpat"]) == pytest.approx(expected, rel=REL)
    # and rpat_term / interpolate directly
    x, xa = t(X4[:2]), t(XA4[:2])
    net = PowNet(W, 3)
    assert torch.equal(interpolate(x, xa, 0.25), 0.25 * x + 0.75 * xa)
    assert val(rpat_term(net(interpolate(x, xa, 0.5)), net(x), net(xa), 0.5)) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("name", WITH_RPAT)
def test_rpat_term_is_zero_for_a_linear_model(name):
    # z linear => z(r x + (1-r) x') = r z(x) + (1-r) z(x') exactly; use non-dyadic random inputs and weights.
    gen = torch.Generator().manual_seed(0)
    B = 4 if name == "consistency" else 3
    x = torch.rand(B, 1, 2, 2, generator=gen, dtype=torch.float64)
    xa = torch.rand(B, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1][:B])
    net = PowNet(torch.randn(3, 4, generator=gen, dtype=torch.float64).tolist(), 1)
    for r in (0.5, 0.25, 0.9):
        base_loss, _ = compute_loss(OBJECTIVES[name], net, x, y, xa)
        loss, parts = compute_loss(OBJECTIVES[name], net, x, y, xa, rpat={"weight": 3.0, "clean_weight": r})
        assert val(parts["rpat"]) == pytest.approx(0.0, abs=1e-25)
        assert val(loss) == pytest.approx(val(base_loss), rel=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 4.0])
@pytest.mark.parametrize("name", WITH_RPAT)
def test_rpat_weight_scales_the_term(name, lam):
    X, XA, Y = data_for(name)
    base, _ = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA))
    loss, parts = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA),
                               rpat={"weight": lam, "clean_weight": 0.25})
    term, _ = h_rpat_closed_form(W, X, XA, 0.25)
    assert val(parts["rpat"]) == pytest.approx(term, rel=REL)  # unweighted, independent of lambda
    assert val(parts["rpat_weighted"]) == pytest.approx(lam * term, rel=REL, abs=1e-15)
    assert val(parts["rpat_weighted"]) == pytest.approx(lam * val(parts["rpat"]), rel=1e-12, abs=1e-15)
    assert val(loss) == pytest.approx(val(base) + lam * term, rel=REL)


def test_rpat_on_unsupported_objective_raises():
    X, XA, Y = data_for("ce")
    with pytest.raises(ValueError):
        compute_loss(OBJECTIVES["ce"], PowNet(W, 3), t(X), lab(Y), t(XA), rpat={})
    with pytest.raises(ValueError):
        compute_loss(OBJECTIVES["ce"], PowNet(W, 3), t(X), lab(Y), t(XA), rpat={"weight": 1.0, "clean_weight": 0.5})


# ---------------------------------------------------------------------------------------------
# Forward calls: count, order, batch (docs/faithfulness.md: "Forward passes and reused logits", D2)

FORWARDS = {
    # name: (without RPAT, with RPAT), as sequences of which input each call saw
    "ce": (["clean"], None),
    "noise": (["adv"], ["adv", "mid", "clean"]),
    "pgd_at": (["adv"], ["adv", "mid", "clean"]),
    "trades": (["clean", "adv", "clean"], ["clean", "adv", "clean", "mid"]),
    "mart": (["clean", "adv"], ["clean", "adv", "mid"]),
    "consistency": (["adv"], ["adv", "mid", "clean"]),
}


def _which(inp, x, xa, xm):
    for label, ref in (("clean", x), ("adv", xa), ("mid", xm)):
        if inp.shape == ref.shape and torch.equal(inp, ref):
            return label
    return "other"


@pytest.mark.parametrize("name", BASELINES)
def test_forward_calls(name):
    X, XA, Y = data_for(name)
    x, xa = t(X), t(XA)
    xm = 0.25 * x + 0.75 * xa
    plain, with_rpat = FORWARDS[name]
    rec = Recorder(PowNet(W, 3))
    compute_loss(OBJECTIVES[name], rec, x, lab(Y), xa)
    assert [_which(i, x, xa, xm) for i in rec.inputs] == plain
    if with_rpat is None:
        return
    rec = Recorder(PowNet(W, 3))
    compute_loss(OBJECTIVES[name], rec, x, lab(Y), xa, rpat={"clean_weight": 0.25})
    assert [_which(i, x, xa, xm) for i in rec.inputs] == with_rpat
    # every call sees the whole batch: 2B rows for Consistency-AT (no splitting, no concatenation of x and x')
    assert all(i.shape == x.shape for i in rec.inputs)


def test_pgd_at_rpat_three_calls_trades_four_mart_three_consistency_three():
    counts = {}
    for name in WITH_RPAT:
        X, XA, Y = data_for(name)
        for on in (False, True):
            rec = Recorder(PowNet(W, 3))
            compute_loss(OBJECTIVES[name], rec, t(X), lab(Y), t(XA), rpat={} if on else None)
            counts[name, on] = len(rec.inputs)
    assert counts == {
        ("noise", False): 1, ("noise", True): 3,
        ("pgd_at", False): 1, ("pgd_at", True): 3,
        ("trades", False): 3, ("trades", True): 4,
        ("mart", False): 2, ("mart", True): 3,
        ("consistency", False): 1, ("consistency", True): 3,
    }


def test_trades_without_second_clean_forward_same_value_one_call_fewer():
    X, XA, Y = data_for("trades")
    rec1, rec2 = Recorder(PowNet(W, 3)), Recorder(PowNet(W, 3))
    l1, _ = compute_loss(OBJECTIVES["trades"], rec1, t(X), lab(Y), t(XA), rpat={})
    l2, _ = compute_loss(OBJECTIVES["trades"], rec2, t(X), lab(Y), t(XA), hp={"second_clean_forward": False}, rpat={})
    assert len(rec1.inputs) == 4 and len(rec2.inputs) == 3
    assert val(l1) == pytest.approx(val(l2), rel=1e-12)


def test_trades_second_clean_forward_is_the_kl_target():
    # A model whose output depends on how often it was called shows which clean forward feeds what:
    # CE uses the first clean call, the KL target the third call (docs/faithfulness.md "TRADES"), RPAT the first.
    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = PowNet(W, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.net(x) + float(self.calls)  # constant shift per call; call k adds k to every logit
    X, XA, Y = data_for("trades")
    _, parts = compute_loss(OBJECTIVES["trades"], Drifting(), t(X), lab(Y), t(XA), rpat={"clean_weight": 0.5})
    Zc = [[v + 1 for v in row] for row in h_logits(W, X, 3)]
    Za = [[v + 2 for v in row] for row in h_logits(W, XA, 3)]
    Zc2 = [[v + 3 for v in row] for row in h_logits(W, X, 3)]
    Zm = [[v + 4 for v in row] for row in h_logits(W, h_mix(X, XA, 0.5), 3)]
    assert val(parts["ce"]) == pytest.approx(h_ce(Zc, Y), rel=REL)
    # softmax is shift invariant, so the KL value cannot tell Zc from Zc2 -- but the RPAT target can:
    assert val(parts["trades_kl"]) == pytest.approx(h_kl_bm([h_softmax(z) for z in Zc2], [h_softmax(z) for z in Za]), rel=REL)
    assert val(parts["rpat"]) == pytest.approx(h_mse(Zm, h_mix(Zc, Za, 0.5)), rel=REL)
    assert val(parts["rpat"]) != pytest.approx(h_mse(Zm, h_mix(Zc2, Za, 0.5)), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# TRADES, MART, Consistency-AT: formula details


def test_trades_closed_form_value():
    # Linear model, B = 2, y = [0, 1]:
    #   z(x)  = [[0.25, 1.25, 0], [1, 2, -1]],  z(x') = [[0.75, 1.5, -0.75], [0.25, 1.25, 0]]
    # CE = mean_i (logsumexp z_i - z_i[y_i]); KL_bm = (1/2) sum_i sum_c p_ic log(p_ic / q_ic), p = softmax z(x), q = softmax z(x').
    zc = [[0.25, 1.25, 0.0], [1.0, 2.0, -1.0]]
    za = [[0.75, 1.5, -0.75], [0.25, 1.25, 0.0]]
    assert h_logits(W, X4[:2], 1) == zc and h_logits(W, XA4[:2], 1) == za

    def lse(z):
        return math.log(sum(math.exp(v) for v in z))

    ce = ((lse(zc[0]) - 0.25) + (lse(zc[1]) - 2.0)) / 2
    kl = 0.0
    for a, b in zip(zc, za):
        # log p_c - log q_c = (a_c - lse(a)) - (b_c - lse(b))
        kl += sum(math.exp(ac - lse(a)) * ((ac - lse(a)) - (bc - lse(b))) for ac, bc in zip(a, b))
    kl /= 2
    for beta in (6.0, 1.0):
        hp = None if beta == 6.0 else {"beta": beta}  # default beta = 6
        loss, parts = compute_loss(OBJECTIVES["trades"], PowNet(W, 1), t(X4[:2]), lab(Y2), t(XA4[:2]), hp=hp)
        assert val(parts["ce"]) == pytest.approx(ce, rel=REL)
        assert val(parts["trades_kl"]) == pytest.approx(kl, rel=REL)
        assert val(parts["trades_kl_weighted"]) == pytest.approx(beta * kl, rel=REL)
        assert val(loss) == pytest.approx(ce + beta * kl, rel=REL)
    # direction: KL(clean || adv), not KL(adv || clean)
    reverse = sum(
        sum(math.exp(bc - lse(b)) * ((bc - lse(b)) - (ac - lse(a))) for ac, bc in zip(a, b)) for a, b in zip(zc, za)
    ) / 2
    assert abs(reverse - kl) > 1e-3 * kl


def _table(columns):
    """Linear map on one-hot inputs: z(e_k) = columns[k]. Returns (model, one-hot maker)."""
    W_t = [[col[c] for col in columns] for c in range(len(columns[0]))]
    n = len(columns)

    def onehot(ids):
        return torch.eye(n, dtype=torch.float64)[list(ids)]

    return PowNet(W_t, 1), onehot


def test_mart_runner_up_rule():
    # Example A: y = 0, z(x'_A) = [2, 1, 0]: argmax p_adv = 0 = y   -> y' = second largest = 1.
    # Example B: y = 1, z(x'_B) = [0, 1, 3]: argmax p_adv = 2 != y  -> y' = 2 (the largest).
    cols = [[1.0, 0.0, -1.0], [0.0, 2.0, 1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]  # ids: clean A, clean B, adv A, adv B
    model, onehot = _table(cols)
    y = [0, 1]
    _, parts = compute_loss(OBJECTIVES["mart"], model, onehot([0, 1]), lab(y), onehot([2, 3]))

    def sm(z):
        return h_softmax(z)

    bce_A = -math.log(1.0001 - sm(cols[2])[1] + 1e-12)
    bce_B = -math.log(1.0001 - sm(cols[3])[2] + 1e-12)
    expected = (bce_A + bce_B) / 2
    assert val(parts["mart_bce"]) == pytest.approx(expected, rel=REL)
    # the rule is discriminating: "always the largest" and "always the second largest" give other numbers
    always_top = (-math.log(1.0001 - sm(cols[2])[0] + 1e-12) + bce_B) / 2
    always_second = (bce_A - math.log(1.0001 - sm(cols[3])[1] + 1e-12)) / 2
    for alt in (always_top, always_second):
        assert val(parts["mart_bce"]) != pytest.approx(alt, rel=1e-3)
    full = h_mart([cols[0], cols[1]], [cols[2], cols[3]], y, 6.0)
    for key, value in full.items():
        assert val(parts[key]) == pytest.approx(value, rel=REL), key


def test_mart_constants():
    # One example, y = 1, placed so that each constant of docs/faithfulness.md "MART" moves the value by far more than 1e-6:
    #   z(x)  = [-20, 0, -20]: p_nat[y] = 1/(1 + 2e^-20) = 1 - 4.1e-9, so (1.0000001 - p_nat[y]) = 1.04e-7 vs 4.1e-9 for "1 -".
    #   z(x') = [0, -40, -30]: argmax 0 != y -> y' = 0, p_adv[0] = 1 - 9.4e-14, so -log(1.0001 - p + 1e-12) ~ -log(1e-4)
    #            (vs ~ -log(1e-12) without the 1.0001); p_adv[1] = e^-40 ~ 4e-18 << 1e-12, so log(p_adv[1] + 1e-12)
    #            ~ log(1e-12) instead of -40.
    zn, za = [-20.0, 0.0, -20.0], [0.0, -40.0, -30.0]
    model, onehot = _table([zn, za])
    pn, pa = h_softmax(zn), h_softmax(za)
    ce = -math.log(pa[1])
    bce = -math.log(1.0001 - pa[0] + 1e-12)
    kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pn, pa))
    rob = kl * (1.0000001 - pn[1])
    for beta in (6.0, 2.0):
        loss, parts = compute_loss(OBJECTIVES["mart"], model, onehot([0]), lab([1]), onehot([1]),
                                   hp=None if beta == 6.0 else {"beta": beta})
        assert val(parts["ce"]) == pytest.approx(ce, rel=REL)
        assert val(parts["mart_bce"]) == pytest.approx(bce, rel=REL)
        assert val(parts["mart_kl"]) == pytest.approx(rob, rel=REL)
        assert val(parts["mart_kl_weighted"]) == pytest.approx(beta * rob, rel=REL)
        assert val(loss) == pytest.approx(ce + bce + beta * rob, rel=REL)
    # sensitivity: dropping any constant changes the answer by much more than the tolerance
    assert abs(-math.log(1.0 - pa[0] + 1e-12) - bce) > 1.0
    assert abs(kl * (1.0 - pn[1]) - rob) > 0.5 * rob
    kl_no_eps = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pn, pa))
    assert abs(kl_no_eps * (1.0000001 - pn[1]) - rob) > 0.1 * rob


def test_mart_kl_term_with_underflowing_clean_probability_is_finite():
    # z(x) = [0, -800, 0] in float64: softmax gives p_nat = [0.5, 0.0, 0.5] exactly (e^-800 underflows).
    # docs/faithfulness.md "MART" computes the sum with KLDivLoss, whose terms with p_nat = 0 are 0 (notation section:
    # "terms with q=0 contribute 0"). y = 0, z(x') = [0, 0, 0]:
    #   KL = 0.5 log(0.5 / (1/3 + 1e-12)) * 2 = log(1.5) (up to the 1e-12), weight 1.0000001 - 0.5.
    zn, za = [0.0, -800.0, 0.0], [0.0, 0.0, 0.0]
    model, onehot = _table([zn, za])
    _, parts = compute_loss(OBJECTIVES["mart"], model, onehot([0]), lab([0]), onehot([1]))
    expected = (0.5 * (math.log(0.5) - math.log(1 / 3 + 1e-12)) * 2) * (1.0000001 - 0.5)
    assert expected == pytest.approx(math.log(1.5) * 0.5000001, rel=1e-9)
    assert val(parts["mart_kl"]) == pytest.approx(expected, rel=REL)


def test_consistency_two_view_layout_and_temperature():
    # Linear model on the 4-row batch [x1; x2] with labels [y; y] = [0, 1, 0, 1]:
    #   z(x') rows: view 1 = rows 0-1, view 2 = rows 2-3. JS pairs row 0 with row 2 and row 1 with row 3.
    X, XA, Y = data_for("consistency")
    Za = h_logits(W, XA, 1)
    assert Za == [[0.75, 1.5, -0.75], [0.25, 1.25, 0.0], [0.0, 1.5, 0.5], [0.0, 0.75, 0.25]]
    for hp in (None, {"temperature": 1.0}, {"temperature": 0.25, "weight": 3.0}):
        T = (hp or {}).get("temperature", 0.5)
        w = (hp or {}).get("weight", 1.0)
        loss, parts = compute_loss(OBJECTIVES["consistency"], PowNet(W, 1), t(X), lab(Y), t(XA), hp=hp)
        ce = h_ce(Za, Y)  # mean over all 2B = 4 rows
        js = h_js(Za[:2], Za[2:], T)  # batchmean over B = 2
        assert val(parts["ce"]) == pytest.approx(ce, rel=REL)
        assert val(parts["consistency_js"]) == pytest.approx(js, rel=REL)
        assert val(parts["consistency_js_weighted"]) == pytest.approx(w * js, rel=REL)
        assert val(loss) == pytest.approx(ce + w * js, rel=REL)
    # the layout matters: pairing rows (0,1) with (2,3) -- not (0,2) with (1,3) -- and T matters (no T^2 factor)
    js = h_js(Za[:2], Za[2:], 0.5)
    assert abs(h_js([Za[0], Za[2]], [Za[1], Za[3]], 0.5) - js) > 1e-3 * js
    assert abs(h_js(Za[:2], Za[2:], 1.0) - js) > 1e-3 * js
    _, parts = compute_loss(OBJECTIVES["consistency"], PowNet(W, 1), t(X), lab(Y), t(XA))
    assert val(parts["consistency_js"]) != pytest.approx(0.25 * js, rel=1e-3)  # no T^2 = 1/4 factor


def test_consistency_js_clamp():
    # Identical views: p = q, so the unclamped JS is exactly 0. With T = 0.5 the logit gap of 10 becomes 20:
    # p_2 = e^-20 / (2 + e^-20) ~ 1.03e-9 < 1e-8, so m_2 is clamped to 1e-8 and the class-2 terms give
    #   JS = 0.5 * [p_2 log(p_2 / 1e-8) + q_2 log(q_2 / 1e-8)] / B = p_2 log(p_2 / 1e-8)   (B = 1, p_2 = q_2) ~ -2.3e-9 != 0.
    z = [0.0, 0.0, -10.0]
    model, onehot = _table([z, z])
    p2 = math.exp(-20) / (2 + math.exp(-20))
    expected = p2 * math.log(p2 / 1e-8)
    assert expected == pytest.approx(h_js([z], [z], 0.5), rel=1e-9)
    assert expected < -1e-9
    _, parts = compute_loss(OBJECTIVES["consistency"], model, onehot([0, 1]), lab([0, 0]), onehot([0, 1]))
    assert val(parts["consistency_js"]) == pytest.approx(expected, rel=REL)


# ---------------------------------------------------------------------------------------------
# hp overrides defaults


def test_hp_overrides_defaults():
    for name, hp in [("trades", {"beta": 1.5}), ("mart", {"beta": 0.5}),
                     ("consistency", {"weight": 2.0, "temperature": 1.0}), ("consistency", {"temperature": 2.0})]:
        X, XA, Y = data_for(name)
        default_loss, _ = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA))
        loss, _ = compute_loss(OBJECTIVES[name], PowNet(W, 3), t(X), lab(Y), t(XA), hp=dict(hp))
        assert val(default_loss) == pytest.approx(h_expected(name, W, X, XA, Y, 3, {}, None)["total"], rel=REL)
        assert val(loss) == pytest.approx(h_expected(name, W, X, XA, Y, 3, hp, None)["total"], rel=REL)
        assert abs(val(loss) - val(default_loss)) > 1e-6
    assert OBJECTIVES["trades"].defaults["beta"] == 6.0  # the defaults are not mutated by an override


# ---------------------------------------------------------------------------------------------
# Gradients: nothing detached


@pytest.mark.parametrize("r", [0.5, 0.25])
@pytest.mark.parametrize("name", WITH_RPAT)
def test_rpat_gradient_flows_through_target(name, r):
    # Term L(W) = (1/(B C)) sum_i ||W h_i||^2 with h_i = x_mid_i^3 - r x_i^3 - (1-r) x'_i^3 (features), so
    #   dL/dW = (2/(B C)) W sum_i h_i h_i^T             (target r z(x) + (1-r) z(x') differentiated too)
    # whereas a detached target would give (2/(B C)) sum_i (W h_i) (x_mid_i^3)^T.
    X, XA, Y = data_for(name)
    net = PowNet(W, 3)
    _, parts = compute_loss(OBJECTIVES[name], net, t(X), lab(Y), t(XA), rpat={"clean_weight": r})
    (grad,) = torch.autograd.grad(parts["rpat"], net.linear.weight)
    B, C, F = len(X), len(W), len(W[0])
    Mid = h_mix(X, XA, r)
    H = [[m**3 - r * a**3 - (1 - r) * b**3 for m, a, b in zip(mr, ar, br)] for mr, ar, br in zip(Mid, X, XA)]
    closed = h_rpat_closed_form(W, X, XA, r)[1]
    assert [v for row in H for v in row] == pytest.approx([v for row in closed for v in row], rel=1e-9, abs=1e-15)
    S = [[sum(h[j] * h[k] for h in H) for k in range(F)] for j in range(F)]
    expected = [[2 / (B * C) * sum(W[c][j] * S[j][k] for j in range(F)) for k in range(F)] for c in range(C)]
    assert grad.flatten().tolist() == pytest.approx([v for row in expected for v in row], rel=REL, abs=1e-15)
    Mid3 = [[v**3 for v in row] for row in Mid]
    Dh = h_logits(W, H, 1)
    detached = [[2 / (B * C) * sum(Dh[i][c] * Mid3[i][k] for i in range(B)) for k in range(F)] for c in range(C)]
    assert grad.flatten().tolist() != pytest.approx([v for row in detached for v in row], rel=1e-3)


@pytest.mark.parametrize("name,rpat", [(n, None) for n in BASELINES]
                         + [(n, {"weight": 2.0, "clean_weight": 0.25}) for n in WITH_RPAT])
def test_total_loss_gradient_matches_finite_differences(name, rpat):
    # A detached tensor anywhere (KL target, MART weight, RPAT target, ...) would make autograd disagree with
    # finite differences of the loss value.
    X, XA, Y = data_for(name)
    x, xa, y = t(X), t(XA), lab(Y)

    def f(weight):
        def model(inp):
            return (inp.flatten(1) ** 3) @ weight.T
        return compute_loss(OBJECTIVES[name], model, x, y, xa, rpat=rpat)[0]

    weight = t(W).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (weight,), eps=1e-6, atol=1e-8, rtol=1e-5)
