"""Exceptions whose text is part of the API: each names the problem and the fix."""


class InputError(ValueError):
    """Bad user input (file, option, tag, selection). The CLI prints it on one line, exit 2."""
