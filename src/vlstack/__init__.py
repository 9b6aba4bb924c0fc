"""vlstack: a self-hosted vision-language stack for the InternVL model family."""

from .api import VLM, load
from .errors import ConfigError, ImageError, PromptError, VLStackError

__version__ = "0.1.0"
__all__ = ["VLM", "load", "ConfigError", "ImageError", "PromptError", "VLStackError", "__version__"]
