"""One small hierarchy of errors. Every message names the bad key or value, says why and what to do.

The gRPC servicer maps each type to exactly one status code (see crosslm_server), so new
error kinds belong here, not as ad-hoc exceptions elsewhere.
"""


class CrossLMError(Exception):
    """Base of every error CrossLM raises on purpose."""


class ConfigError(CrossLMError):
    """A config file or flag has a bad value (maps to INVALID_ARGUMENT)."""


class AssetMissingError(CrossLMError):
    """A model or dataset package is not installed (maps to FAILED_PRECONDITION)."""


class DataError(CrossLMError):
    """A dataset file is malformed; the message names file, line and problem (INVALID_ARGUMENT)."""


class BundleError(CrossLMError):
    """An SLM bundle failed validation (INVALID_ARGUMENT)."""


class NotFoundError(CrossLMError):
    """An id names nothing we hold (NOT_FOUND)."""


class PermissionDeniedError(CrossLMError):
    """A caller asked for something that is not theirs (PERMISSION_DENIED)."""


class ResourceExhaustedError(CrossLMError):
    """A size, count or queue cap was reached (RESOURCE_EXHAUSTED)."""


class PreconditionError(CrossLMError):
    """The call is valid but the state does not allow it yet (FAILED_PRECONDITION)."""
