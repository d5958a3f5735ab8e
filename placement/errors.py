"""Errors raised for bad user input (traces, placements, checkpoints, options).

Every message names what is wrong. The CLI turns an ``InputError`` into a one-line message and exit status 2.
"""


class InputError(ValueError):
    """Base class: the user gave us something we refuse. The message says exactly what."""


class TraceError(InputError):
    """A routing trace is malformed or does not fit what it is used with."""


class PlacementError(InputError):
    """A placement is malformed or does not fit the trace, model or cluster it is used with."""


def parse_enum(enum_cls, value: str, what: str):
    """``enum_cls(value)``, or an InputError that names the accepted values."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_cls)
        raise InputError(f"unknown {what} {value!r} (choose from {choices})") from None
