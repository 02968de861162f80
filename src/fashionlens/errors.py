"""Errors that the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed CSV, an unknown model name.

    The CLI prints ``str(error)`` on one line and exits with code 2; nothing already stored
    is changed.
    """
