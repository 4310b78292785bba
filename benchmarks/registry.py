"""The registry of the benchmarks: ops, their cases and providers, the modes and suites, and
:class:`UsageError`.

Case files in :mod:`benchmarks.cases` fill a :class:`Registry`; tests build their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

# The provider that calls the public op with ``auto``: what a user gets without choosing.
AUTO_PROVIDER = "peftops"

# Suites a case can belong to. ``quick`` is the one small real-shape case per op used by
# ``--quick`` on a GPU; on a CPU ``--quick`` runs the scaled-down ``quick-cpu`` cases instead,
# where a Llama-shaped call takes seconds.
FULL, QUICK, QUICK_CPU = "full", "quick", "quick-cpu"
ALL_SUITES = frozenset({FULL, QUICK, QUICK_CPU})


class UsageError(Exception):
    """A bad command line or input file: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Registry: ops, cases, providers
# ---------------------------------------------------------------------------------------------

Inputs = dict  # name -> Tensor (or a Python constant such as a scale), made by Case.make_inputs


@dataclass(frozen=True)
class Work:
    """What one pass must do at least: ``flops``, and ``elems`` read plus written once each.

    ``elems`` counts the pass's interface (its inputs and outputs), never intermediates that an
    implementation may keep or recompute; bytes are ``elems * itemsize`` of the run's dtype.
    """

    flops: float
    elems: float

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.elems + other.elems)


@dataclass(frozen=True)
class Provider:
    """One implementation of an op, timed on every case of the op.

    ``fn(inputs) -> Tensor`` computes the forward; autograd gives the backward.
    ``checked=False`` marks a provider that computes something else on purpose (a base layer
    or a memory floor): it is timed but not compared with the reference.
    ``work(case, direction)``, if given, replaces the case's work for this provider (a base
    that does less than the op should not be credited with the op's flops).
    ``untimed``, if set, says why the provider is checked but not timed (Triton kernels under
    the CPU interpreter: correct answers are worth checking, interpreter speed is not).
    """

    name: str
    fn: Callable[[Inputs], torch.Tensor]
    checked: bool = True
    work: Callable[[Case, str], Work] | None = None
    untimed: str | None = None


@dataclass(frozen=True)
class Op:
    """An op: its float32 reference (``reference(inputs) -> Tensor``) and its providers.

    ``providers(device)`` lists the providers that can run on ``device`` (the peftops backends
    available there differ by device).
    ``auto_rivals`` names the baselines that the ``auto`` provider (:data:`AUTO_PROVIDER`) must
    be no slower than, the better of them in the same case and mode of the same run.
    ``auto_pick(inputs)``, if given, names the backend ``auto`` resolves to on those inputs
    (``None`` if it cannot tell), recorded with the ``auto`` provider's results.
    """

    name: str
    reference: Callable[[Inputs], torch.Tensor]
    providers: Callable[[torch.device], list[Provider]]
    auto_rivals: tuple[str, ...] = ()
    auto_pick: Callable[[Inputs], str | None] | None = None


@dataclass(frozen=True)
class Case:
    """One problem size of an op.

    ``make_inputs(dtype, device, generator)`` returns fresh random inputs (never zeros);
    ``grad_inputs`` names the inputs that receive gradients (frozen weights are left out);
    ``work(direction)`` gives the :class:`Work` of ``"fwd"`` or ``"bwd"`` (``fwd+bwd`` is their
    sum); ``base`` names the provider of the ratio column; ``params`` describes the shape
    (written to the JSON). ``unchecked``, if set, says why no provider of this case can be
    compared with the reference (a random dropout mask differs between implementations);
    such a case is timed only, and other cases of the op check the same code paths.
    """

    op: str
    name: str
    make_inputs: Callable[[torch.dtype, torch.device, torch.Generator], Inputs]
    grad_inputs: tuple[str, ...]
    work: Callable[[str], Work]
    base: str
    params: dict = field(default_factory=dict)
    suites: frozenset = frozenset({FULL})
    unchecked: str | None = None


class Registry:
    """Ops and their cases. Case files call :meth:`add_op` and :meth:`add_case`."""

    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}
        self.cases: list[Case] = []

    def add_op(self, op: Op) -> None:
        if op.name in self.ops:
            raise ValueError(f"op {op.name!r} is already registered")
        self.ops[op.name] = op

    def add_case(self, case: Case) -> None:
        if case.op not in self.ops:
            raise ValueError(f"case {case.name!r}: register op {case.op!r} first")
        if any(c.op == case.op and c.name == case.name for c in self.cases):
            raise ValueError(f"case {case.op}/{case.name} is already registered")
        unknown = set(case.suites) - ALL_SUITES
        if unknown:
            raise ValueError(f"case {case.name!r}: unknown suites {sorted(unknown)}; expected {sorted(ALL_SUITES)}")
        self.cases.append(case)

    def add_provider(self, op: str, provider: Provider) -> None:
        """Add a provider to an already registered op (tests add deliberately wrong ones)."""
        old = self.ops[op]
        self.ops[op] = dataclasses.replace(old, providers=lambda device: [*old.providers(device), provider])
