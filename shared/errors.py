"""One small hierarchy of errors. Every message names the bad key or value, says why and what to do.

Every error CrossLM raises to a caller is defined here: the gRPC servicer maps each type to
exactly one status code (crosslm_server/service/servicer.py, docs/service.md), so a new kind of
error belongs here, not as an ad-hoc exception elsewhere. (Private control flow inside one module,
such as the demo supervisor's "a child failed", stays in that module.)
"""
from typing import Any


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


class LeaseLostError(PreconditionError):
    """A worker's lease on a round expired and was taken over: it must not publish that round."""


class AdapterConflictError(PreconditionError):
    """A round's adapter version was published by another round first (the compare-and-swap failed)."""


class InvalidRequestError(CrossLMError):
    """A request field is malformed (INVALID_ARGUMENT)."""


class StoppingError(CrossLMError):
    """The server is shutting down; the caller should reconnect and resume (UNAVAILABLE)."""


class UnauthenticatedError(CrossLMError):
    """The caller has no identity the server accepts (UNAUTHENTICATED)."""


class NotReadyError(CrossLMError):
    """The server cannot take this request yet (the engine is starting); retry (UNAVAILABLE)."""


class RoundError(CrossLMError):
    """A round cannot go on; the message is written for the silo (no server paths)."""


class RecordValueError(CrossLMError):
    """A metric, event field or event kind the wire cannot carry; the message names it."""


class UploadConflictError(CrossLMError):
    """An upload id is reused with a different manifest (ALREADY_EXISTS)."""


class ChunkError(BundleError):
    """A chunk is corrupt (CRC mismatch) or does not continue the file (INVALID_ARGUMENT)."""


class OffsetError(PreconditionError):
    """A chunk's offset is not the committed size: ask for the committed size and resume there."""


class PrivacyError(CrossLMError):
    """A silo's privacy policy refuses to train or send: the ε budget is spent, or the
    membership-inference audit's AUC exceeds its bound (the silo's exit code 6). ``report``:
    the figures behind the refusal, for the silo's round report."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = dict(report or {})


class DemoReportError(CrossLMError):
    """The silos' reports lack what the demo report needs (a silo or round did not finish)."""


class TransportError(CrossLMError):
    """A call failed for good; `code` is the gRPC status (exit code 3 for auth, 4 otherwise)."""

    def __init__(self, message: str, code: Any = None):  # code: a grpc.StatusCode
        super().__init__(message)
        self.code = code
