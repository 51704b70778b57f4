"""The one exception type that the command line turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a file, an option or a combination that cannot work.

    The message names the file or option and the problem in one line; the command line
    prints it as ``error: <message>`` and exits with code 2, without a traceback.
    """
