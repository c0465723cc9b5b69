"""The ``openmm-reversible`` subcommands, one module each, over the library.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` (its options) and
``run(args) -> int``. ``run`` calls library functions with plain arguments, prints their results
on standard output and returns the exit code; bad input raises
:class:`~openmm_reversible.errors.InputError`, which :func:`openmm_reversible.cli.main` reports
on one line of standard error. Library modules neither parse options, nor print results, nor
exit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

OK = 0
"""Exit code: success; a check within tolerance."""
OUTSIDE_TOLERANCE = 1
"""Exit code: computed, but outside tolerance (or the training failed)."""
BAD_INPUT = 2
"""Exit code: bad input (a file, an option, a tag); one line on standard error."""
INTERNAL_ERROR = 3
"""Exit code: an unexpected exception; one line, the traceback with ``--debug``."""

NAMES = ("verify", "gradcheck", "benchmark", "fit", "export", "validate", "demo")
"""The subcommands, in the order ``--help`` lists them; module ``commands.<name>`` each."""


def defaults(function: Callable) -> dict[str, object]:
    """Default values of ``function``'s parameters, so that an option's default is the library's
    own (one value in one place)."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def with_epochs(config, epochs: int | None):
    """``config`` with ``schedule.epochs`` replaced by ``epochs`` (unchanged for None).

    Raises
    ------
    InputError
        If ``epochs`` < 1.
    """
    import dataclasses

    from ..errors import check_at_least

    if epochs is None:
        return config
    check_at_least(1, epochs=epochs)
    return dataclasses.replace(config,
                               schedule=dataclasses.replace(config.schedule, epochs=epochs))


def train(trainer, command: str):
    """Run ``trainer`` to the end; on :class:`~openmm_reversible.train.TrainingFailed` print
    why on one line of standard error and return None (the command then exits
    :data:`OUTSIDE_TOLERANCE`)."""
    import sys

    from ..train import TrainingFailed

    try:
        return trainer.run()
    except TrainingFailed as exc:
        print(f"openmm-reversible {command}: training failed: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return None
