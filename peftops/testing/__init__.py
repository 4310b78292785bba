"""What tests and benchmarks share: the tolerance policy and input makers."""

from .tolerances import BACKWARD, FORWARD, Tol, assert_close, check_fa_rule, close_report, tolerance

__all__ = ["BACKWARD", "FORWARD", "Tol", "assert_close", "check_fa_rule", "close_report", "tolerance"]
