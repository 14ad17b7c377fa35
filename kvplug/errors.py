"""The one error type users see for a bad strategy spec or parameter."""


class SpecError(ValueError):
    """A strategy spec or parameter a user wrote is wrong; the message is one line that says how."""
