"""optstudy: a platform for studying stochastic gradient optimizers."""

from optstudy.errors import ConfigError, OptstudyError

__all__ = ["ConfigError", "OptstudyError"]
__version__ = "0.1.0"
