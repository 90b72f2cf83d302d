"""The one exception type users see: a one-line message saying what is wrong and where."""


class HerdError(Exception):
    """A failure caused by input (a file, an argument, a request) rather than by a bug.

    The command line prints its message on one line instead of a traceback; the server turns
    it into a 400-class response.
    """
