"""gRPC transport for crosslm.v1.CrossLM: decode, call the service, encode, map errors.

Errors are mapped to status codes in one place (`STATUS_OF`); nothing else in the server
knows about gRPC codes. The caller's silo comes from the TLS peer certificate's CN, or in
plaintext dev mode from the `x-crosslm-silo` metadata header.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from crosslm_shared import convert
from crosslm_shared.errors import (AssetMissingError, BundleError, ConfigError, CrossLMError, DataError,
                                   InvalidRequestError, NotFoundError, NotReadyError, PermissionDeniedError,
                                   PreconditionError, ResourceExhaustedError, StoppingError,
                                   UnauthenticatedError, UploadConflictError)
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.transfer import Chunk, IdleWatchdog
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.logic import CrossLMService

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["CrossLM"].full_name  # "crosslm.v1.CrossLM"
_SILO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Most specific first: the first matching class decides the code.
STATUS_OF: tuple[tuple[type[CrossLMError], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (StoppingError, grpc.StatusCode.UNAVAILABLE),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UploadConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AssetMissingError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.INVALID_ARGUMENT),
    (DataError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CrossLMError, grpc.StatusCode.INTERNAL),
)


def status_of(error: CrossLMError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_OF if isinstance(error, cls))


class Malformed:
    """A request whose bytes did not parse: the handler answers INVALID_ARGUMENT (grpc itself
    would answer INTERNAL "Exception deserializing request!" and log a traceback)."""

    def __init__(self, message: str, error: Exception):
        self.message, self.error = message, error

    def raise_(self) -> None:
        raise InvalidRequestError(f"a {self.message} message is malformed ({type(self.error).__name__}): "
                                  "send a message of crosslm.v1 as generated from the proto")


def _tolerant(parse, message: str):
    """A request deserializer that never raises: a parse error becomes a `Malformed` request."""
    def parse_or_malformed(raw: bytes):
        try:
            return parse(raw)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's malformed message
            return Malformed(message, e)
    return parse_or_malformed


def _checked(request):
    if isinstance(request, Malformed):
        request.raise_()
    return request


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> None:
    """The one place where an exception becomes a status for the caller; one log line per
    dropped stream (the traceback only for errors that are the server's own)."""
    if getattr(context, "crosslm_idle_cut", False):  # whatever the cut stream raised next: logged at the cut
        context.abort(grpc.StatusCode.CANCELLED, "the stream ended")
    if isinstance(error, CrossLMError):
        log.info("%s refused: %s: %s", method, type(error).__name__, error)
        context.abort(status_of(error), str(error))
    if not context.is_active():  # the caller went away
        log.info("%s ended: the caller is gone (%s)", method, type(error).__name__)
        context.abort(grpc.StatusCode.CANCELLED, "the stream ended")  # no response to serialize
    log.exception("%s failed unexpectedly", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error ({type(error).__name__}); "
                  "retry, and tell the server's operator if it persists")


def _mapped(method):
    """Map errors of a unary or client-stream handler (see `_abort`)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error leaves as a status, never a traceback
            _abort(context, method.__name__, e)
    return wrapper


def _mapped_stream(method):
    """The same for server-stream handlers (generators)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error leaves as a status, never a traceback
            _abort(context, method.__name__, e)
    return wrapper


def _cancel_idle(context: grpc.ServicerContext, silo: str, upload_id: str, idle_s: float) -> None:
    what = f"upload {upload_id!r}" if upload_id else "an upload stream"
    log.warning("%s from silo %s: no progress for %.0f s; stream cancelled (it can resume)", what, silo, idle_s)
    details = (f"{what} made no progress (no header, no bytes) for {idle_s:.0f} s (server idle_timeout_s): the "
               "stream was cut; resume it from QueryUpload's committed offsets")
    context.crosslm_idle_cut = True  # this is the one log line of this stream's end (see `_abort`)
    try:  # grpc's public cancel() sends a bare CANCELLED; the core call can carry a status and a reason
        context._rpc_event.call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], details)
    except Exception:  # noqa: BLE001 - another grpc version: the bare cancel still cuts the stream
        context.cancel()


class CrossLMServicer(pb_grpc.CrossLMServicer):
    def __init__(self, service: CrossLMService, metrics: Metrics, *, allow_dev_identity: bool,
                 idle_timeout_s: float = 0.0, max_uploads_per_silo: int = 4, max_streams_per_silo: int = 8,
                 max_streams: int = 1_000_000):
        self.service, self.metrics, self.allow_dev_identity = service, metrics, allow_dev_identity
        self.idle_timeout_s, self.max_uploads_per_silo = idle_timeout_s, max_uploads_per_silo
        self.max_streams_per_silo, self.max_streams = max_streams_per_silo, max_streams
        self._streams: Counter[tuple[str, str]] = Counter()  # (silo, "upload" | "watch" | "download") -> open
        self._streams_lock = threading.Lock()

    @contextmanager
    def _stream_slot(self, silo: str, kind: str):
        """Admission control for streams, which hold a handler thread each for as long as they
        last: one silo may hold `max_streams_per_silo` of them (`max_uploads_per_silo` uploads),
        and all silos together `max_streams`, so threads stay free for unary calls and health."""
        with self._streams_lock:
            mine = sum(n for (who, _), n in self._streams.items() if who == silo)
            if kind == "upload" and self._streams[(silo, kind)] >= self.max_uploads_per_silo:
                raise ResourceExhaustedError(
                    f"silo {silo!r} already has {self._streams[(silo, kind)]} uploads streaming (server "
                    f"max_uploads_per_silo={self.max_uploads_per_silo}): finish or cancel one, then retry")
            if mine >= self.max_streams_per_silo:
                raise ResourceExhaustedError(
                    f"silo {silo!r} already has {mine} streams open (Upload, Watch and Download together; server "
                    f"max_streams_per_silo={self.max_streams_per_silo}): close one, then retry")
            if sum(self._streams.values()) >= self.max_streams:
                raise ResourceExhaustedError(
                    f"the server has {self.max_streams} streams open (grpc_workers less reserved_workers): retry "
                    "in a moment")
            self._streams[(silo, kind)] += 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams[(silo, kind)] -= 1

    def identify(self, context: grpc.ServicerContext) -> str:
        cn = context.auth_context().get("x509_common_name")
        if cn:
            silo = cn[0].decode(errors="replace")
            if _SILO_RE.match(silo):
                return silo
            raise UnauthenticatedError(f"certificate CN {silo!r} is not a valid silo name; ask the server's "
                                       "operator for a certificate made by `crosslm certs`")
        if self.allow_dev_identity:
            silo = dict(context.invocation_metadata()).get(convert.SILO_METADATA_KEY, "")
            if _SILO_RE.match(silo):
                return silo
            raise UnauthenticatedError(f"dev mode: send your silo name in the {convert.SILO_METADATA_KEY!r} "
                                       f"metadata header (got {silo!r})")
        raise UnauthenticatedError("no client certificate: connect with mTLS using your silo's certificate")

    @_mapped
    def Upload(self, request_iterator, context):
        silo = self.identify(context)
        with self._stream_slot(silo, "upload"):
            header: list[str] = []  # the upload id, once the header arrived (for the idle message)
            watchdog = IdleWatchdog(self.idle_timeout_s, lambda: _cancel_idle(
                context, silo, header[0] if header else "", self.idle_timeout_s))
            try:
                return self._upload(silo, request_iterator, context, watchdog, header)
            finally:
                watchdog.close()

    def _upload(self, silo: str, request_iterator, context, watchdog: IdleWatchdog, header: list[str]):
        first = _checked(next(request_iterator, None))  # the idle clock runs from the stream's start
        if not isinstance(first, pb.UploadRequest) or first.WhichOneof("kind") != "header":
            raise InvalidRequestError("the first Upload message must be an UploadHeader (upload_id + manifest)")
        watchdog.kick()
        header.append(first.header.upload_id)
        manifest = convert.manifest_from_pb(first.header.manifest)
        gauge = self.metrics.active_transfers.labels("upload")
        gauge.inc()
        try:
            upload, committed = self.service.receive_upload(
                silo, first.header.upload_id, manifest, self._chunks(request_iterator, watchdog))
        finally:
            gauge.dec()
        return convert.upload_status_to_pb(upload, committed)

    @staticmethod
    def _chunks(request_iterator, watchdog: IdleWatchdog) -> Iterator:
        """The stream's chunks; the idle clock runs only while waiting for the silo's next message,
        not while the server writes, hashes or checks what it sent (a content check can take seconds)."""
        for msg in request_iterator:  # Chunks, or protobuf for anything else (`add_to_server`)
            msg = _checked(msg)
            if not isinstance(msg, Chunk):
                raise InvalidRequestError("only the first Upload message may be a header; send chunks after it")
            if msg.data:  # progress means bytes: empty chunks do not keep a stream alive
                watchdog.hold(True)
                yield msg
                watchdog.hold(False)
            else:
                yield msg
        watchdog.hold(True)  # the stream ended: what remains (verification, the content check) is ours

    @_mapped
    def QueryUpload(self, request, context):
        upload, committed = self.service.query_upload(self.identify(context), _checked(request).upload_id)
        return convert.upload_status_to_pb(upload, committed)

    @_mapped
    def Submit(self, request, context):
        return convert.submission_to_pb(self.service.submit(self.identify(context), _checked(request).upload_id))

    @_mapped_stream
    def Watch(self, request, context):
        silo, request = self.identify(context), _checked(request)
        with self._stream_slot(silo, "watch"):
            for event in self.service.watch(silo, request.submission_id, request.after_seq, active=context.is_active):
                yield convert.event_to_pb(event)

    @_mapped_stream
    def Download(self, request, context):
        silo, request = self.identify(context), _checked(request)
        with self._stream_slot(silo, "download"):
            chunks = self.service.download(silo, request.submission_id, request.file, request.offset,
                                           request.chunk_size)
            gauge = self.metrics.active_transfers.labels("download")
            gauge.inc()
            try:
                for chunk in chunks:  # encoded by convert.chunk_to_wire (`add_to_server`)
                    self.metrics.bytes_out.inc(len(chunk.data))
                    yield chunk
            finally:
                gauge.dec()

    @_mapped
    def GetSubmission(self, request, context):
        return convert.submission_to_pb(self.service.get_submission(self.identify(context),
                                                                    _checked(request).submission_id))

    @_mapped
    def ListSubmissions(self, request, context):
        _checked(request)
        subs = self.service.list_submissions(self.identify(context))
        return pb.ListSubmissionsResponse(submissions=[convert.submission_to_pb(s) for s in subs])


def add_to_server(servicer: CrossLMServicer, server: grpc.Server) -> None:
    """Register the servicer: the generated protobuf codecs, except the chunk fast path of
    Upload requests and Download responses (`crosslm_shared.convert`, same bytes on the wire)."""
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(
            servicer.Upload, request_deserializer=_tolerant(convert.upload_request_from_wire, "UploadRequest"),
            response_serializer=pb.UploadStatus.SerializeToString),
        "QueryUpload": grpc.unary_unary_rpc_method_handler(
            servicer.QueryUpload, request_deserializer=_tolerant(pb.QueryUploadRequest.FromString, "QueryUploadRequest"),
            response_serializer=pb.UploadStatus.SerializeToString),
        "Submit": grpc.unary_unary_rpc_method_handler(
            servicer.Submit, request_deserializer=_tolerant(pb.SubmitRequest.FromString, "SubmitRequest"),
            response_serializer=pb.Submission.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request_deserializer=_tolerant(pb.WatchRequest.FromString, "WatchRequest"),
            response_serializer=pb.Event.SerializeToString),
        "Download": grpc.unary_stream_rpc_method_handler(
            servicer.Download, request_deserializer=_tolerant(pb.DownloadRequest.FromString, "DownloadRequest"),
            response_serializer=convert.chunk_to_wire),
        "GetSubmission": grpc.unary_unary_rpc_method_handler(
            servicer.GetSubmission, request_deserializer=_tolerant(pb.GetSubmissionRequest.FromString, "GetSubmissionRequest"),
            response_serializer=pb.Submission.SerializeToString),
        "ListSubmissions": grpc.unary_unary_rpc_method_handler(
            servicer.ListSubmissions, request_deserializer=_tolerant(pb.ListSubmissionsRequest.FromString, "ListSubmissionsRequest"),
            response_serializer=pb.ListSubmissionsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
