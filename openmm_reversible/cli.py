"""``openmm-reversible`` command line.

Each subcommand is a module of :mod:`openmm_reversible.commands` (``HELP``,
``add_arguments(parser)``, ``run(args) -> int``); this file builds the parser and turns what a
command raises into an exit code and one line on standard error. Every command exits with

- **0**: success; the check is within tolerance;
- **1**: computed, but outside tolerance (verify, gradcheck, validate, demo), or the training
  failed (fit);
- **2**: bad input: one line naming the file or option, the problem and the fix (a usage
  error, such as a missing option, too);
- **3**: internal error (an unexpected exception): one short line; the global ``--debug``
  flag prints the traceback as well.

Results go to standard output, progress bars and errors to standard error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import __version__
from .commands import BAD_INPUT, INTERNAL_ERROR, NAMES, OK

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT, as shells report it)."""

_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help states its default: the value, ``off`` for a flag, the help's own
    words where it already says what the default is (``default: the config's``), or
    ``required``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0 and action.default is False:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on standard error (exit 2)."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the traceback as well (default: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="openmm-reversible", formatter_class=HelpFormatter,
        description="Train OpenMM force fields by differentiating through molecular dynamics "
                    "with reversible simulation.",
        epilog="exit codes: 0 success or within tolerance, 1 outside tolerance (or training "
               "failed), 2 bad input, 3 internal error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in NAMES:
        module = importlib.import_module(f"{__package__}.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        # Also accepted after the command; SUPPRESS keeps the global value when absent.
        _add_debug(p, argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def _report(exc: Exception) -> tuple[int, str]:
    """Exit code and one-line message for an exception a command raised."""
    from .errors import InputError
    from .potential.base import UnsupportedForceError

    text = " ".join(str(exc).split())
    if isinstance(exc, InputError | UnsupportedForceError):
        return BAD_INPUT, f"error: {text}"
    if isinstance(exc, _FILE_ERRORS) and exc.filename is not None:
        return BAD_INPUT, f"error: {exc.filename}: {exc.strerror}; check the path"
    return INTERNAL_ERROR, (f"internal error: {type(exc).__name__}: {text[:300]} (rerun with "
                            "--debug for the traceback, and please report it)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return OK
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print(f"openmm-reversible {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        code, message = _report(exc)
        if args.debug:
            traceback.print_exc()
        print(f"openmm-reversible {args.command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
