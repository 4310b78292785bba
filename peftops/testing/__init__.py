"""What tests and benchmarks share: the tolerance policy (:mod:`.tolerances`).

Inputs are made where they are used, since nothing else needs them: hypothesis strategies and
case inputs in ``tests/strategies.py``, benchmark shapes in ``benchmarks/cases/<op>.py``.
"""

from .tolerances import BACKWARD, FORWARD, Tol, assert_close, check_fa_rule, close_report, tolerance

__all__ = ["BACKWARD", "FORWARD", "Tol", "assert_close", "check_fa_rule", "close_report", "tolerance"]
