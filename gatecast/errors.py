"""The root of the errors a person can act on; the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Something the user supplied is wrong; the message says what, where, and what was expected."""
