"""The project's exception root.

Every error caused by user input (a config value, a name, a keyword) is a ``ConfigError`` whose message names the key,
the rule and the value, so entry points can print it as one paragraph without a traceback.
"""


class OptstudyError(Exception):
    """Root of every exception optstudy raises on purpose."""


class ConfigError(OptstudyError, ValueError):
    """A user-supplied value breaks a rule: the message names the key, the rule and the value."""
