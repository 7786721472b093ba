"""Errors of kdpm2 that are more specific than the built-in ``ValueError`` / ``TypeError`` / ``LookupError``."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(ValueError, FloatingPointError):
    """A substep met NaN or inf while the scheduler's opt-in ``check_finite`` mode was on.

    Attributes:
        name: Which array held the non-finite values (``"model_output"``, ``"sample"`` or ``"prev_sample"``).
        substep: Index of the substep (the scheduler's ``step_index`` before the call).
        sigma: The noise level the model saw at that substep.
        count: How many elements were NaN or inf.
    """

    def __init__(self, name: str, substep: int, sigma: float, count: int, kind: str):
        self.name, self.substep, self.sigma, self.count = name, substep, sigma, count
        super().__init__(
            f"{name} has {count} non-finite value(s) (NaN or inf) at substep {substep} ({kind}, sigma {sigma:.6g}); "
            "the scheduler state was left unchanged"
        )
