class D3FastError(Exception):
    """An error caused by the user's input or environment, with a message that says what
    to do. The CLI prints it without a traceback and exits with status 2."""
