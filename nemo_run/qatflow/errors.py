"""Errors the flow reports to the user as one line that names the setting or input and the fix. At the bottom of
the package: settings, paths and every check raise them."""


class ConfigError(ValueError):
    """A setting is wrong; the message names the setting and the fix."""
