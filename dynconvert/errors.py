"""The exception types dynconvert raises for problems the user can fix."""


class DynconvertError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


class NotApplicable(DynconvertError):
    """The strategy cannot convert this kind of network at all (not a fault of the settings):
    for instance a resolution cascade of a network that runs at one input size only."""
