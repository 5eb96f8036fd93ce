class D3FastError(Exception):
    """An error caused by the user's input or environment, with a message that says what
    to do. The CLI prints it without a traceback and exits with status 2."""


class Interrupted(D3FastError):
    """Work stopped by Ctrl-C or SIGTERM after saving what was finished; the message says
    how to continue. The CLI exits with status 130 (the lines it printed already say it);
    the Python API raises it."""
