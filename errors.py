"""The one exception for a mistake in the user's input, shared by every module."""


class UserError(ValueError):
    """A mistake in the user's input (flag, file, data). configurator.run prints it as one line and exits with 2.
    A ValueError, so functions that check their arguments with the scripts' checks still raise that type."""
