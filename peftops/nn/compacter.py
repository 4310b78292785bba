r"""Compacter (Mahabadi et al. 2021): bottleneck adapters with PHM (Kronecker-sum) projections.

:func:`compacter_adapter` builds the adapter's ``d x r`` down and ``r x d`` up weights from the
PHM parameters (:mod:`peftops.reference.compacter` is the spec) and runs the fused
:func:`peftops.bottleneck_adapter` op on them; autograd carries the op's weight gradients back
through the build to the rule ``A_i`` and the factors of ``B_i``. The build is one einsum per
projection, ``O(n * d * r)``, negligible next to the op's ``T x d x r`` GEMMs.

Parameters and initialisation follow AdapterHub's ``PHMLayer`` with its ``BnConfig`` defaults
(``phm_dim=4``, ``phm_rank=1``, ``factorized_phm_W=True``, ``shared_phm_rule=True``,
``factorized_phm_rule=False``, ``phm_c_init="normal"``, ``phm_init_range=1e-4``,
``phm_bias=True``):

* the rule: ``N(0, phm_init_range)`` when shared (:class:`PHMRule`, one per model), ``N(0, 0.01)``
  when a layer owns it, as AdapterHub; with ``factorized_phm_rule`` ``A_i = a_i c_i^T``;
* the factors ``L_i: (in/n, k)``, ``R_i: (k, out/n)``: Xavier-normal per ``i``, which is what
  AdapterHub's ``init_W`` draws for every ``hypercomplex_nonlinearity`` (its first branch tests
  the string's truth); biases zero;
* except that the up projection's ``R_i`` start at zero, so a fresh adapter is the identity
  (serial) or adds nothing (parallel), as every peftops adapter; AdapterHub's starts near, not
  at, the identity.

Not offered: ``phm_c_init="uniform"``, unfactorised or shared ``W`` (``factorized_phm_W=False``,
``shared_W_phm``), a frozen rule (``learn_phm=False``: freeze ``PHMRule``'s parameters instead).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import validate as check
from ..ops.bottleneck_adapter import bottleneck_adapter
from ..reference import ACTIVATIONS
from ._base import AdapterModule, finite, positive_int, strict_bool

__all__ = ["CompacterAdapter", "PHMRule", "compacter_adapter", "phm_weight"]

OP = "compacter_adapter"


def phm_weight(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``(sum_i A_i kron L_i R_i)^T``, shape ``(out, in)``: a PHM layer's weight in ``nn.Linear``'s
    orientation, built in one contraction (``rule: (n, n, n)``, ``left: (n, in/n, k)``,
    ``right: (n, k, out/n)``)."""
    n, p, q = rule.shape[0], left.shape[1], right.shape[2]
    # H^T[b*q + j, a*p + i] = sum_m A_m[a, b] (L_m R_m)[i, j], written straight in (out, in) order.
    return torch.einsum("mab,mik,mkj->bjai", rule, left, right).reshape(n * q, n * p)


def _check_phm(x: Tensor, rule: Tensor, factors: tuple[tuple[str, Tensor], ...], d: int) -> int:
    n = rule.shape[0]
    if n == 0:
        raise ValueError(f"{OP}: rule: expected phm_dim n >= 1, got shape {tuple(rule.shape)}")
    check.shape(OP, "rule", rule, (n, n, n), "(n, n, n)")
    (dl_name, dl), (dr_name, dr), (ul_name, ul), (ur_name, ur) = factors
    if d % n:
        raise ValueError(f"{OP}: x: expected a feature dim d divisible by phm_dim n={n} (from rule), got d={d}")
    check.shape(OP, dl_name, dl, (n, d // n, None), f"(n, d/n, k) with n={n} from rule, d={d} from x")
    k = dl.shape[2]
    check.shape(OP, dr_name, dr, (n, k, None), f"(n, k, r/n) with n={n} from rule, k={k} from {dl_name}")
    r = n * dr.shape[2]
    check.shape(OP, ul_name, ul, (n, r // n, None), f"(n, r/n, k') with n={n} from rule, r={r} from {dr_name}")
    check.shape(OP, ur_name, ur, (n, ul.shape[2], d // n), f"(n, k', d/n) with n={n} from rule, d={d} from x")
    return r


def compacter_adapter(
    x: Tensor,
    rule: Tensor,
    down_left: Tensor,
    down_right: Tensor,
    down_bias: Tensor | None,
    up_left: Tensor,
    up_right: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    r"""Compacter adapter: :func:`peftops.bottleneck_adapter` on the PHM-built weights
    ``Wd = phm_weight(rule, down_left, down_right): (r, d)``, ``Wu = phm_weight(rule, up_left,
    up_right): (d, r)``. Shapes: ``rule (n, n, n)``, ``down_left (n, d/n, k)``,
    ``down_right (n, k, r/n)``, ``up_left (n, r/n, k)``, ``up_right (n, k, d/n)``; the rest as
    the op's. :func:`peftops.reference.compacter.compacter_adapter` is the spec."""
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "rule", rule, 3)
    factors = (("down_left", down_left), ("down_right", down_right), ("up_left", up_left), ("up_right", up_right))
    for name, t in factors:
        check.tensor(OP, name, t, 3)
    check.same_dtype_device(OP, "rule", rule, factors)
    _check_phm(x, rule, factors, x.shape[-1])
    wd = phm_weight(rule, down_left, down_right)
    wu = phm_weight(rule, up_left, up_right)
    return bottleneck_adapter(x, wd, down_bias, wu, up_bias, activation=activation, scale=scale, residual=residual)


class PHMRule(AdapterModule):
    r"""The PHM rule ``A: (n, n, n)`` (the ``A_i`` of ``W = sum_i A_i kron B_i``), one module to be
    shared by many :class:`CompacterAdapter`\ s (AdapterHub's ``shared_phm_rule=True``): each
    holds this same module, so the rule is one Parameter however many layers use it.

    ``factorized=True``: ``A_i = a_i c_i^T`` from ``left: (n, n, 1)``, ``right: (n, 1, n)``.
    Initialised ``N(0, init_range)`` (AdapterHub: ``phm_init_range``, 1e-4 for a shared rule).
    """

    def __init__(
        self, phm_dim: int = 4, factorized: bool = False, init_range: float = 1e-4, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        owner = "PHMRule"
        self.phm_dim = n = positive_int(owner, "phm_dim", phm_dim)
        self.factorized = strict_bool(owner, "factorized", factorized)
        std = finite(owner, "init_range", init_range)
        if std <= 0:
            raise ValueError(f"{owner}: init_range: expected a number > 0, got {std}")
        factory = {"device": device, "dtype": dtype}
        if self.factorized:
            self.left = nn.Parameter(torch.randn(n, n, 1, **factory) * std)
            self.right = nn.Parameter(torch.randn(n, 1, n, **factory) * std)
        else:
            self.rule = nn.Parameter(torch.randn(n, n, n, **factory) * std)

    def forward(self) -> Tensor:
        return torch.bmm(self.left, self.right) if self.factorized else self.rule

    def extra_repr(self) -> str:
        return f"phm_dim={self.phm_dim}, factorized={self.factorized}"


def _xavier_normal(n: int, rows: int, cols: int, factory: dict) -> Tensor:
    # One Xavier draw per i over the (rows, cols) matrix, as AdapterHub's init_W loops.
    std = math.sqrt(2.0 / (rows + cols))
    return torch.randn(n, rows, cols, **factory) * std


class CompacterAdapter(AdapterModule):
    r"""A bottleneck adapter ``y = res + scale * up(act(down(x)))`` with PHM projections
    ``down: d -> r``, ``up: r -> d`` (``d`` and ``r`` multiples of ``phm_dim``).

    Serial (``parallel=False``): ``forward(x)``, ``res = x``. Parallel: ``forward(x, residual)``.
    ``phm_rule``: a :class:`PHMRule` to share (AdapterHub's ``shared_phm_rule=True``); ``None``
    gives the adapter its own, ``N(0, 0.01)`` as AdapterHub's per-layer rule, factorised if
    ``factorized_phm_rule``. Parameters: ``phm_rule.*``, ``down_left (n, d/n, k)``,
    ``down_right (n, k, r/n)``, ``down_bias (r,)``, ``up_left (n, r/n, k)``,
    ``up_right (n, k, d/n)``, ``up_bias (d,)`` (no biases with ``phm_bias=False``).
    """

    def __init__(
        self,
        d: int,
        r: int,
        activation: str = "gelu",
        scale: float = 1.0,
        parallel: bool = False,
        *,
        phm_dim: int = 4,
        phm_rank: int = 1,
        phm_rule: PHMRule | None = None,
        factorized_phm_rule: bool = False,
        phm_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = "CompacterAdapter"
        d = positive_int(owner, "d", d)
        r = positive_int(owner, "r", r)
        n = positive_int(owner, "phm_dim", phm_dim)
        k = positive_int(owner, "phm_rank", phm_rank)
        for name, value in (("d", d), ("r", r)):
            if value % n:
                raise ValueError(f"{owner}: {name}: expected a multiple of phm_dim={n}, got {value}")
        if not isinstance(activation, str):
            raise TypeError(f"{owner}: activation: expected a str, got {type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: activation: expected one of {ACTIVATIONS}, got {activation!r}")
        factorized_phm_rule = strict_bool(owner, "factorized_phm_rule", factorized_phm_rule)
        phm_bias = strict_bool(owner, "phm_bias", phm_bias)
        self.d, self.r, self.phm_dim, self.phm_rank, self.activation = d, r, n, k, activation
        self.parallel = strict_bool(owner, "parallel", parallel)
        self.scale = finite(owner, "scale", scale)
        factory = {"device": device, "dtype": dtype}
        if phm_rule is None:
            phm_rule = PHMRule(n, factorized_phm_rule, init_range=0.01, **factory)
        elif not isinstance(phm_rule, PHMRule):
            raise TypeError(f"{owner}: phm_rule: expected a PHMRule or None, got {type(phm_rule).__name__}")
        elif phm_rule.phm_dim != n:
            raise ValueError(f"{owner}: phm_rule: expected phm_dim={n}, got a PHMRule with phm_dim={phm_rule.phm_dim}")
        self.phm_rule = phm_rule
        self.down_left = nn.Parameter(_xavier_normal(n, d // n, k, factory))
        self.down_right = nn.Parameter(_xavier_normal(n, k, r // n, factory))
        self.up_left = nn.Parameter(_xavier_normal(n, r // n, k, factory))
        self.up_right = nn.Parameter(torch.zeros(n, k, d // n, **factory))
        self.down_bias = nn.Parameter(torch.zeros(r, **factory)) if phm_bias else None
        self.up_bias = nn.Parameter(torch.zeros(d, **factory)) if phm_bias else None

    def weights(self) -> tuple[Tensor, Tensor]:
        """The ``(Wd: (r, d), Wu: (d, r))`` the adapter currently computes with."""
        rule = self.phm_rule()
        return phm_weight(rule, self.down_left, self.down_right), phm_weight(rule, self.up_left, self.up_right)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.parallel and residual is None:
            raise ValueError("CompacterAdapter(parallel=True): residual: expected the sublayer's output, got None")
        if not self.parallel and residual is not None:
            raise ValueError(
                "CompacterAdapter(parallel=False): residual: expected None (a serial adapter adds to x), got a tensor"
            )
        return compacter_adapter(
            x,
            self.phm_rule(),
            self.down_left,
            self.down_right,
            self.down_bias,
            self.up_left,
            self.up_right,
            self.up_bias,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
        )

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, r={self.r}, phm_dim={self.phm_dim}, phm_rank={self.phm_rank}, "
            f"activation={self.activation!r}, scale={self.scale:g}, parallel={self.parallel}"
        )
