"""The ``epserve`` console script.

    argv --> argparse (one sub-command per module in COMMAND_MODULES) --> command function
         --> InputError: one line on stderr, exit status 2, nothing written

Each command module defines ``register(subparsers)``, which adds its sub-commands and sets ``func`` on them;
``func(args) -> int`` returns the exit status. Reading environment variables happens in launch/ only.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from placement.errors import InputError

COMMAND_MODULES = (
    "launch.place_cmd",      # place, simulate
    "launch.serve_cmd",      # serve
    "launch.offline_cmd",    # trace, batch
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless the default is None or a flag's False, or the help
    already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.option_strings and all(action.default is not v for v in (None, False, argparse.SUPPRESS))
                and "default" not in help_text):
            help_text += " (default: %(default)s)"
        return help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"epserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
