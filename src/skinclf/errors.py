"""User-facing errors: one clear line, a non-zero exit, no traceback wall."""


class SkinclfError(Exception):
    """A problem with the user's input (path, config, data) that the user can fix.

    The message must name what is wrong and where (the path, key or value) and what
    was expected; the CLI prints it as a single ``error:`` line and exits with code 2.
    """


EXIT_USER_ERROR = 2
