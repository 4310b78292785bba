"""``BottleneckAdapter``: serial (Houlsby/Pfeiffer) or parallel (He et al. 2022) adapter."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.bottleneck_adapter import bottleneck_adapter
from ..reference import ACTIVATIONS
from ._base import AdapterModule, finite, positive_int, strict_bool


class BottleneckAdapter(AdapterModule):
    r"""``y = res + scale * up(act(down(x)))`` with ``down: d -> r``, ``up: r -> d``.

    Serial (``parallel=False``): ``forward(x)`` with ``res = x``, placed after a sublayer.
    Parallel: ``forward(x, residual)`` where ``x`` is the sublayer's input and ``residual``
    its output. The up projection starts at zero, so a fresh adapter is the identity
    (serial) or adds nothing (parallel).
    """

    def __init__(
        self,
        d: int,
        r: int,
        activation: str = "gelu",
        scale: float = 1.0,
        parallel: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        d = positive_int("BottleneckAdapter", "d", d)
        r = positive_int("BottleneckAdapter", "r", r)
        if not isinstance(activation, str):
            raise TypeError(f"BottleneckAdapter: activation: expected a str, got {type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"BottleneckAdapter: activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.d, self.r, self.activation = d, r, activation
        self.parallel = strict_bool("BottleneckAdapter", "parallel", parallel)
        self.scale = finite("BottleneckAdapter", "scale", scale)
        self.down = nn.Linear(d, r, device=device, dtype=dtype)
        self.up = nn.Linear(r, d, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.parallel and residual is None:
            raise ValueError("BottleneckAdapter(parallel=True): residual: expected the sublayer's output, got None")
        if not self.parallel and residual is not None:
            raise ValueError(
                "BottleneckAdapter(parallel=False): residual: expected None (a serial adapter adds to x), got a tensor"
            )
        return bottleneck_adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
        )

    def extra_repr(self) -> str:
        return f"d={self.d}, r={self.r}, activation={self.activation!r}, scale={self.scale:g}, parallel={self.parallel}"
