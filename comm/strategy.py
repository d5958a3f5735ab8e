"""The Strategy Enum, shared with the placement simulator (one Enum: the simulator and the runtime must agree
on what each strategy means). Import it from here in comm/, epserve/ and launch/."""

from placement.simulate import Strategy
from placement.tp_shuffle import AttentionLayout

__all__ = ["AttentionLayout", "Strategy"]
