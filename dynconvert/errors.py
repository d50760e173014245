"""The one exception type dynconvert raises for problems the user can fix."""


class DynconvertError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""
