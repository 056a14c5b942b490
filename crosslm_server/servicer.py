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
                                   NotFoundError, PermissionDeniedError, PreconditionError,
                                   ResourceExhaustedError)
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.transfer import Chunk, IdleWatchdog
from crosslm_server.metrics import Metrics
from crosslm_server.service import CrossLMService, InvalidRequestError, StoppingError, UnauthenticatedError
from crosslm_server.store import UploadConflictError

log = logging.getLogger(__name__)
SILO_METADATA_KEY = "x-crosslm-silo"
SERVICE = pb.DESCRIPTOR.services_by_name["CrossLM"].full_name  # "crosslm.v1.CrossLM"
_SILO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Most specific first: the first matching class decides the code.
STATUS_OF: tuple[tuple[type[CrossLMError], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (StoppingError, grpc.StatusCode.UNAVAILABLE),
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


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> None:
    """The one place where an exception becomes a status for the caller."""
    if isinstance(error, CrossLMError):
        context.abort(status_of(error), str(error))
    if not context.is_active():  # the caller went away (or an idle timeout cut the stream)
        log.info("%s ended: the caller is gone (%s)", method, type(error).__name__)
        return
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
    log.warning("upload %s from silo %s: no bytes for %.0f s; stream cancelled (it can resume)", upload_id, silo, idle_s)
    details = (f"upload {upload_id!r} sent no bytes for {idle_s:.0f} s (server idle_timeout_s): the stream was cut; "
               "resume it from QueryUpload's committed offsets")
    try:  # grpc's public cancel() sends a bare CANCELLED; the core call can carry a status and a reason
        context._rpc_event.call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], details)
    except Exception:  # noqa: BLE001 - another grpc version: the bare cancel still cuts the stream
        context.cancel()


class CrossLMServicer(pb_grpc.CrossLMServicer):
    def __init__(self, service: CrossLMService, metrics: Metrics, *, allow_dev_identity: bool,
                 idle_timeout_s: float = 0.0, max_uploads_per_silo: int = 4):
        self.service, self.metrics, self.allow_dev_identity = service, metrics, allow_dev_identity
        self.idle_timeout_s, self.max_uploads_per_silo = idle_timeout_s, max_uploads_per_silo
        self._streaming: Counter[str] = Counter()  # silo -> open Upload streams
        self._streaming_lock = threading.Lock()

    @contextmanager
    def _upload_slot(self, silo: str):
        """Admission control: one silo may hold at most `max_uploads_per_silo` handler threads."""
        with self._streaming_lock:
            if self._streaming[silo] >= self.max_uploads_per_silo:
                raise ResourceExhaustedError(
                    f"silo {silo!r} already has {self._streaming[silo]} uploads streaming (server "
                    f"max_uploads_per_silo={self.max_uploads_per_silo}): finish or cancel one, then retry")
            self._streaming[silo] += 1
        try:
            yield
        finally:
            with self._streaming_lock:
                self._streaming[silo] -= 1

    def identify(self, context: grpc.ServicerContext) -> str:
        cn = context.auth_context().get("x509_common_name")
        if cn:
            silo = cn[0].decode(errors="replace")
            if _SILO_RE.match(silo):
                return silo
            raise UnauthenticatedError(f"certificate CN {silo!r} is not a valid silo name; ask the server's "
                                       "operator for a certificate made by `crosslm certs`")
        if self.allow_dev_identity:
            silo = dict(context.invocation_metadata()).get(SILO_METADATA_KEY, "")
            if _SILO_RE.match(silo):
                return silo
            raise UnauthenticatedError(f"dev mode: send your silo name in the {SILO_METADATA_KEY!r} "
                                       f"metadata header (got {silo!r})")
        raise UnauthenticatedError("no client certificate: connect with mTLS using your silo's certificate")

    @_mapped
    def Upload(self, request_iterator, context):
        silo = self.identify(context)
        with self._upload_slot(silo):
            return self._upload(silo, request_iterator, context)

    def _upload(self, silo: str, request_iterator, context):
        first = next(request_iterator, None)
        if not isinstance(first, pb.UploadRequest) or first.WhichOneof("kind") != "header":
            raise InvalidRequestError("the first Upload message must be an UploadHeader (upload_id + manifest)")
        manifest = convert.manifest_from_pb(first.header.manifest)
        gauge = self.metrics.active_transfers.labels("upload")
        gauge.inc()
        watchdog = IdleWatchdog(self.idle_timeout_s,
                                lambda: _cancel_idle(context, silo, first.header.upload_id, self.idle_timeout_s))
        try:
            upload, committed = self.service.receive_upload(
                silo, first.header.upload_id, manifest, self._chunks(request_iterator, watchdog))
        finally:
            watchdog.close()
            gauge.dec()
        return convert.upload_status_to_pb(upload, committed)

    @staticmethod
    def _chunks(request_iterator, watchdog: IdleWatchdog) -> Iterator:
        for msg in request_iterator:  # Chunks, or protobuf for anything else (`add_to_server`)
            watchdog.kick()
            if not isinstance(msg, Chunk):
                raise InvalidRequestError("only the first Upload message may be a header; send chunks after it")
            yield msg

    @_mapped
    def QueryUpload(self, request, context):
        upload, committed = self.service.query_upload(self.identify(context), request.upload_id)
        return convert.upload_status_to_pb(upload, committed)

    @_mapped
    def Submit(self, request, context):
        return convert.submission_to_pb(self.service.submit(self.identify(context), request.upload_id))

    @_mapped_stream
    def Watch(self, request, context):
        events = self.service.watch(self.identify(context), request.submission_id, request.after_seq,
                                    active=context.is_active)
        for event in events:
            yield convert.event_to_pb(event)

    @_mapped_stream
    def Download(self, request, context):
        chunks = self.service.download(self.identify(context), request.submission_id, request.file,
                                       request.offset, request.chunk_size)
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
        return convert.submission_to_pb(self.service.get_submission(self.identify(context), request.submission_id))

    @_mapped
    def ListSubmissions(self, request, context):
        subs = self.service.list_submissions(self.identify(context))
        return pb.ListSubmissionsResponse(submissions=[convert.submission_to_pb(s) for s in subs])


def add_to_server(servicer: CrossLMServicer, server: grpc.Server) -> None:
    """Register the servicer: the generated protobuf codecs, except the chunk fast path of
    Upload requests and Download responses (`crosslm_shared.convert`, same bytes on the wire)."""
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(
            servicer.Upload, request_deserializer=convert.upload_request_from_wire,
            response_serializer=pb.UploadStatus.SerializeToString),
        "QueryUpload": grpc.unary_unary_rpc_method_handler(
            servicer.QueryUpload, request_deserializer=pb.QueryUploadRequest.FromString,
            response_serializer=pb.UploadStatus.SerializeToString),
        "Submit": grpc.unary_unary_rpc_method_handler(
            servicer.Submit, request_deserializer=pb.SubmitRequest.FromString,
            response_serializer=pb.Submission.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request_deserializer=pb.WatchRequest.FromString,
            response_serializer=pb.Event.SerializeToString),
        "Download": grpc.unary_stream_rpc_method_handler(
            servicer.Download, request_deserializer=pb.DownloadRequest.FromString,
            response_serializer=convert.chunk_to_wire),
        "GetSubmission": grpc.unary_unary_rpc_method_handler(
            servicer.GetSubmission, request_deserializer=pb.GetSubmissionRequest.FromString,
            response_serializer=pb.Submission.SerializeToString),
        "ListSubmissions": grpc.unary_unary_rpc_method_handler(
            servicer.ListSubmissions, request_deserializer=pb.ListSubmissionsRequest.FromString,
            response_serializer=pb.ListSubmissionsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
