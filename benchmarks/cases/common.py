"""Helpers the case files share: random inputs and the providers every op has."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import peftops

from ..registry import AUTO_PROVIDER, FULL, QUICK, Inputs, Op, Provider, Registry


def normal(
    gen: torch.Generator, shape: Sequence[int], std: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``N(0, std^2)`` drawn in float32 (so every dtype sees the same values up to rounding)."""
    return (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def real_shape_suites(name: str, quick_case: str) -> frozenset:
    """A real-shape case runs in the full suite; the op's ``quick_case`` also in ``--quick`` on a GPU."""
    return frozenset({FULL, QUICK}) if name == quick_case else frozenset({FULL})


def _peftops_provider(public: Callable[[Inputs], torch.Tensor], backend: str, device: torch.device) -> Provider:
    """``peftops[<backend>]``, or :data:`AUTO_PROVIDER` for ``auto``. The backend is always
    selected explicitly, so that a ``PEFTOPS_BACKEND`` in the environment changes nothing."""

    def fn(inputs: Inputs) -> torch.Tensor:
        # The backward runs on the forward's backend (peftops records it), so the block only
        # needs to cover the forward.
        with peftops.use_backend(backend):
            return public(inputs)

    interpreted = backend == "triton" and device.type == "cpu"
    name = AUTO_PROVIDER if backend == "auto" else f"peftops[{backend}]"
    return Provider(name, fn, untimed="Triton interpreter (TRITON_INTERPRET=1)" if interpreted else None)


def _compiled(fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
    """``torch.compile(fn, dynamic=False)``, created at the first call: ``torch.compile`` imports
    the compiler (1.7 s on the 2-core CPU machine), which a run that does not select this
    provider should not pay."""
    compiled = None

    def call(inputs: Inputs) -> torch.Tensor:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(inputs)

    return call


def register_op(
    registry: Registry,
    name: str,
    public: Callable[[Inputs], torch.Tensor],
    reference: Callable[[Inputs], torch.Tensor],
    baselines: Sequence[Provider],
    auto_rivals: Sequence[str] = (),
    auto_pick: Callable[[Inputs], str | None] | None = None,
    device_providers: Callable[[torch.device], Sequence[Provider]] | None = None,
    backends_of: str | None = None,
) -> None:
    """Register op ``name`` with its standard providers, then ``baselines``.

    * ``peftops``: ``public(inputs)`` inside ``peftops.use_backend("auto")``, what a user who
      chooses nothing gets;
    * ``peftops[<backend>]`` for each backend in ``peftops.available_backends(backends_of or name, device)``
      (whatever backends peftops registers, none named here): ``public(inputs)`` inside
      ``peftops.use_backend(backend)``;
    * ``reference``: the reference function with plain autograd, in the run's dtype;
    * ``compile(reference)``: ``torch.compile`` of it (``dynamic=False``: one graph per shape,
      as a model with fixed shapes would get).

    ``reference`` is also the float32 spec every checked provider is compared against.
    ``auto_rivals`` and ``auto_pick`` are :class:`Op`'s. ``device_providers(device)`` adds
    providers that depend on the device (a backend's internal paths forced one by one).
    ``backends_of`` names the peftops op whose backends these providers select, when the
    benchmark op is a mode of another op (prefix banks are ``prefix_attention`` with ids).
    """

    def providers(device: torch.device) -> list[Provider]:
        backends = [
            _peftops_provider(public, b, device)
            for b in ("auto", *peftops.available_backends(backends_of or name, device))
        ]
        return [
            *backends,
            Provider("reference", reference),
            Provider("compile(reference)", _compiled(reference)),
            *baselines,
            *(device_providers(device) if device_providers is not None else ()),
        ]

    registry.add_op(Op(name, reference, providers, tuple(auto_rivals), auto_pick))
