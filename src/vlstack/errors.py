"""The errors vlstack raises for bad input: each names the problem, so callers can show it as is."""


class VLStackError(Exception):
    """Base class: a problem with what the user gave us (not a bug in vlstack)."""


class ConfigError(VLStackError):
    """A checkpoint directory or config.json that vlstack cannot use."""


class ImageError(VLStackError):
    """An image that cannot be decoded or is over the configured limits."""


class PromptError(VLStackError):
    """A prompt that cannot be run: too long for the context, images and placeholders that disagree, ..."""


class UnknownModel(VLStackError):
    """A model or adapter name that is not served (or no longer: an adapter being unloaded)."""


class DataError(VLStackError):
    """A dataset file vlstack cannot read: a missing column, a malformed line, an image that does not decode."""


class EndpointError(VLStackError):
    """A remote API that cannot be used: unreachable, a refused key, an unknown model, too many failures."""
