"""Compacter: the spec (``peftops.reference.compacter``) against a Kronecker-free formulation, the
op path (``peftops.nn.compacter``: PHM-built weights through the fused adapter op) against the
spec on each backend, and ``CompacterAdapter`` / ``PHMRule``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftops.backends import use_backend
from peftops.nn.compacter import CompacterAdapter, PHMRule, compacter_adapter, phm_weight
from peftops.reference import compacter as ref
from peftops.testing.tolerances import assert_close

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def params(n=4, d=16, r=8, k=1, dtype=torch.float64, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()

    return {
        "rule": rnd(n, n, n),
        "down_left": rnd(n, d // n, k),
        "down_right": rnd(n, k, r // n),
        "down_bias": rnd(r) if biases else None,
        "up_left": rnd(n, r // n, k),
        "up_right": rnd(n, k, d // n),
        "up_bias": rnd(d) if biases else None,
    }


def phm_apply(x, rule, left, right):
    """``x @ (sum_i A_i kron L_i R_i)`` without forming a Kronecker product or the weight: ``x``
    split into ``n`` blocks of ``in/n``, each mixed by the rule and mapped by the low-rank factors."""
    n, p = rule.shape[0], left.shape[1]
    xb = x.reshape(*x.shape[:-1], n, p)
    y = torch.einsum("...ai,mab,mik,mkj->...bj", xb, rule, left, right)
    return y.reshape(*x.shape[:-1], -1)


def independent(x, p, activation, scale, residual):
    h = phm_apply(x, p["rule"], p["down_left"], p["down_right"])
    if p["down_bias"] is not None:
        h = h + p["down_bias"]
    z = phm_apply(ACT[activation](h), p["rule"], p["up_left"], p["up_right"])
    if p["up_bias"] is not None:
        z = z + p["up_bias"]
    return (x if residual is None else residual) + scale * z


def up32(t):
    return None if t is None else t.detach().float().requires_grad_()


def grads(y, tensors):
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad(y, live, torch.ones_like(y))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(("k", "biases", "activation"), [(1, True, "gelu"), (2, False, "silu")])
def test_reference_matches_kronecker_free_formulation(parallel, k, biases, activation):
    p = params(k=k, biases=biases)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 16, dtype=torch.float64) if parallel else None
    y = ref.compacter_adapter(x, *p.values(), activation=activation, scale=0.7, residual=res)
    expected = independent(x, p, activation, 0.7, res)
    torch.testing.assert_close(y, expected)
    inputs = [x, *p.values()]
    for got, want in zip(grads(y, inputs), grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want)


def test_phm_matrix_is_the_kronecker_sum():
    # Written out for n=2 on 1x1 factors: H = A_0 * b_0 + A_1 * b_1.
    rule = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])
    left, right = torch.tensor([2.0, -1.0]).reshape(2, 1, 1), torch.tensor([3.0, 5.0]).reshape(2, 1, 1)
    expected = rule[0] * 6.0 + rule[1] * -5.0
    torch.testing.assert_close(ref.phm_matrix(rule, left, right), expected)
    torch.testing.assert_close(phm_weight(rule, left, right), expected.T)


def test_phm_weight_matches_spec():
    p = params(d=16, r=8, k=3)
    torch.testing.assert_close(
        phm_weight(p["rule"], p["down_left"], p["down_right"]),
        ref.phm_matrix(p["rule"], p["down_left"], p["down_right"]).T,
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("parallel", [False, True])
def test_op_path_matches_spec_every_gradient(backend, parallel):
    # float32 through the op against the float64 spec on the same values, with the tolerance policy.
    p64 = params(seed=1)
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    res64 = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True) if parallel else None
    p, x, res = ({k: up32(v) for k, v in p64.items()}, up32(x64), up32(res64))
    with use_backend(backend):
        y = compacter_adapter(x, *p.values(), activation="gelu", scale=2.0, residual=res)
    expected = ref.compacter_adapter(x64, *p64.values(), activation="gelu", scale=2.0, residual=res64)
    assert_close(y, expected, kind="fwd")
    inputs = [x, *p.values()] + ([res] if parallel else [])
    inputs64 = [x64, *p64.values()] + ([res64] if parallel else [])
    for got, want in zip(grads(y, inputs), grads(expected, inputs64), strict=True):
        assert_close(got, want, kind="bwd")


def test_op_path_gradcheck():
    p = params(d=8, r=4, seed=2)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, *ps: compacter_adapter(x, *ps, activation="gelu", scale=1.5), (x, *p.values())
        )


def test_module_identity_at_init_then_learns_through_shared_rule():
    torch.manual_seed(0)
    shared = PHMRule(4)
    a = CompacterAdapter(16, 8, phm_rule=shared)
    b = CompacterAdapter(16, 8, activation="relu", scale=4.0, parallel=True, phm_rule=shared)
    assert a.phm_rule.rule is b.phm_rule.rule  # one Parameter, counted once
    params_ab = {id(t) for t in [*a.parameters(), *b.parameters()]}
    assert len(params_ab) == 1 + 2 * 6
    x = torch.randn(4, 16)
    h = torch.randn(4, 16)
    torch.testing.assert_close(a(x), x, rtol=0, atol=0)
    torch.testing.assert_close(b(x, h), h, rtol=0, atol=0)
    # The weights the module computes with, against the spec.
    wd, wu = a.weights()
    sd, su = ref.compacter_weights(shared.rule, a.down_left, a.down_right, a.up_left, a.up_right)
    torch.testing.assert_close(wd, sd)
    torch.testing.assert_close(wu, su)
    assert wd.shape == (8, 16) and wu.shape == (16, 8)

    (a(x).square().sum() + b(x, h).square().sum()).backward()
    assert shared.rule.grad is None or not shared.rule.grad.any()  # up is zero: nothing reaches A yet
    assert a.up_right.grad.abs().sum() > 0 and b.up_right.grad.abs().sum() > 0
    opt = torch.optim.SGD({id(t): t for t in [*a.parameters(), *b.parameters()]}.values(), lr=1.0)
    opt.step()
    opt.zero_grad()
    a(x).square().sum().backward()
    assert shared.rule.grad.abs().sum() > 0  # now the rule learns, from both uses of the same tensor


def test_module_init_as_adapterhub():
    torch.manual_seed(0)
    m = CompacterAdapter(64, 32, phm_dim=4, phm_rank=1)
    assert m.phm_rule.rule.shape == (4, 4, 4)
    assert 0.005 < m.phm_rule.rule.std().item() < 0.02  # an unshared rule: N(0, 0.01)
    assert 1e-5 < PHMRule(4).rule.std().item() < 2e-4  # a shared one: N(0, phm_init_range=1e-4)
    assert m.down_left.shape == (4, 16, 1) and m.down_right.shape == (4, 1, 8)
    assert m.up_left.shape == (4, 8, 1) and m.up_right.shape == (4, 1, 16)
    assert not m.up_right.any() and not m.down_bias.any() and not m.up_bias.any()
    f = PHMRule(4, factorized=True)
    assert f.left.shape == (4, 4, 1) and f.right.shape == (4, 1, 4) and f().shape == (4, 4, 4)
    nb = CompacterAdapter(8, 4, phm_bias=False, phm_rule=f)
    assert nb.down_bias is None and nb.up_bias is None
    x = torch.randn(2, 8)
    torch.testing.assert_close(nb(x), x)


def test_bad_input_names_the_argument():
    p = params(dtype=torch.float32)
    x = torch.randn(3, 16)
    args = dict(p)
    with pytest.raises(ValueError, match=r"compacter_adapter: x: expected a feature dim d divisible by phm_dim n=4"):
        compacter_adapter(torch.randn(3, 18), *args.values())
    args["down_left"] = torch.randn(4, 3, 1)
    with pytest.raises(ValueError, match=r"compacter_adapter: down_left: expected shape \(4, 4, \*\).*got \(4, 3, 1\)"):
        compacter_adapter(x, *args.values())
    with pytest.raises(ValueError, match=r"compacter_adapter: up_right: expected shape \(4, 1, 4\).*got \(4, 2, 4\)"):
        compacter_adapter(x, *dict(p, up_right=torch.randn(4, 2, 4)).values())
    with pytest.raises(TypeError, match=r"compacter_adapter: up_left: expected dtype torch.float32"):
        compacter_adapter(x, *dict(p, up_left=p["up_left"].double()).values())
    with pytest.raises(ValueError, match=r"CompacterAdapter: r: expected a multiple of phm_dim=4, got 6"):
        CompacterAdapter(16, 6)
    with pytest.raises(ValueError, match=r"CompacterAdapter: phm_rule: expected phm_dim=2"):
        CompacterAdapter(16, 8, phm_dim=2, phm_rule=PHMRule(4))
    with pytest.raises(TypeError, match=r"CompacterAdapter: phm_rule: expected a PHMRule or None, got Tensor"):
        CompacterAdapter(16, 8, phm_rule=torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match=r"CompacterAdapter\(parallel=True\): residual"):
        CompacterAdapter(16, 8, parallel=True)(x)


@pytest.mark.parametrize("parallel", [False, True])
def test_torch_compile_fullgraph_matches_eager(parallel):
    torch.manual_seed(0)
    m = CompacterAdapter(16, 8, parallel=parallel)
    with torch.no_grad():
        m.up_right.normal_()
    x = torch.randn(2, 3, 16)
    args = (x, torch.randn(2, 3, 16)) if parallel else (x,)

    def run(fn):
        m.zero_grad()
        y = fn(*args)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    y, g = run(m)
    y_c, g_c = run(torch.compile(m, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_c, y)
    for a, b in zip(g_c, g, strict=True):
        torch.testing.assert_close(a, b)
