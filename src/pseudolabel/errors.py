"""The one exception type for problems a user can cause and fix."""


class PseudoLabelError(Exception):
    """A user-fixable problem: the message says what was wrong, where, and what to do."""
