"""Strategy Enum (temporary home until placement/simulate.py lands on main; then re-exported from there)."""

from __future__ import annotations

import enum

from placement.errors import InputError


class Strategy(enum.Enum):
    TWO_A2A = "two_a2a"
    COHERENT = "coherent"
    SPECULATIVE = "speculative"
    SPECULATIVE_TWO_A2A = "speculative_two_a2a"

    @property
    def coherent(self) -> bool:
        return self in (Strategy.COHERENT, Strategy.SPECULATIVE)

    @property
    def needs_predictor(self) -> bool:
        return self in (Strategy.SPECULATIVE, Strategy.SPECULATIVE_TWO_A2A)

    @classmethod
    def parse(cls, name: str) -> "Strategy":
        try:
            return cls(name)
        except ValueError:
            raise InputError(f"unknown strategy {name!r} (choose from {', '.join(s.value for s in cls)})") from None
