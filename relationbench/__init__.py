"""relationbench: benchmark relation-aware customized image generation.

Importing the package is light: no torch model is built, nothing touches the network.
"""

__version__ = "0.1.0"

from .errors import UserError

__all__ = ["UserError", "__version__"]
