"""The silo's side of the wire: resumable upload, watch and download over gRPC.

Retries with exponential backoff and full jitter on transient codes (UNAVAILABLE,
DEADLINE_EXCEEDED, a cancelled or broken stream); every retry first asks the server what it
already holds, so at most one in-flight chunk is sent twice. Auth and invalid-argument
errors are fatal at once. No call has a total deadline: a slow transfer that is making
progress is never cut; HTTP/2 keepalive pings detect a dead peer instead.
"""
from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from crosslm_shared import convert
from crosslm_shared.bundle import Manifest, open_regular
from crosslm_shared.certs import read_pem
from crosslm_shared.errors import BundleError, TransportError
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.records import TERMINAL_EVENTS, Event, Submission
from crosslm_shared.transfer import DEFAULT_CHUNK_SIZE, Chunk, IdleWatchdog, PartialFile, iter_chunks

log = logging.getLogger(__name__)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
FATAL_AUTH = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
UPLOAD_METHOD = "/crosslm.v1.CrossLM/Upload"
DOWNLOAD_METHOD = "/crosslm.v1.CrossLM/Download"


@dataclass(frozen=True)
class TlsFiles:
    """mTLS material of one silo: the CA that signed the server, and the silo's certificate and key."""
    ca: Path
    cert: Path
    key: Path
    server_name: str = ""  # overrides the name checked against the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=read_pem(self.ca, "[server] ca"),
                                            private_key=read_pem(self.key, "[server] key"),
                                            certificate_chain=read_pem(self.cert, "[server] cert"))


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    max_attempts: int = 10

    def delays(self) -> Iterator[float]:
        """Full-jitter exponential backoff: uniform(0, min(max, initial * multiplier**n))."""
        for n in range(self.max_attempts - 1):
            yield random.uniform(0, min(self.max_s, self.initial_s * self.multiplier ** n))


class CrossLMClient:
    def __init__(self, address: str, silo: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_message_bytes: int = 6 * 1024 * 1024, retry: RetryPolicy = RetryPolicy(),
                 keepalive_s: int = 30, idle_timeout_s: float = 120.0, tls: TlsFiles | None = None):
        """`tls=None` is plaintext dev mode: the silo names itself in a header. With `tls` the
        server reads the silo from the certificate's CN and `silo` is only used in logs."""
        self.address, self.silo, self.chunk_size, self.retry = address, silo, chunk_size, retry
        self.idle_timeout_s = idle_timeout_s
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.keepalive_time_ms", keepalive_s * 1000),
                         ("grpc.keepalive_timeout_ms", 20_000)]
        self._tls = tls
        self._credentials = tls.credentials() if tls else None
        if tls and tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._metadata = () if tls else ((convert.SILO_METADATA_KEY, silo),)
        self.channel: grpc.Channel | None = None
        self._connect()

    def _connect(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self._credentials is None:
            self.channel = grpc.insecure_channel(self.address, options=self._options)
        else:
            self.channel = grpc.secure_channel(self.address, self._credentials, options=self._options)
        self.stub = pb_grpc.CrossLMStub(self.channel)
        # the chunk fast path (crosslm_shared.convert): the same bytes as the stub's, fewer copies
        self._upload_call = self.channel.stream_unary(
            UPLOAD_METHOD, request_serializer=convert.upload_request_to_wire,
            response_deserializer=pb.UploadStatus.FromString)
        self._download_call = self.channel.unary_stream(
            DOWNLOAD_METHOD, request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=convert.chunk_from_wire)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def __enter__(self) -> "CrossLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- retries ----------------------------------------------------------------------------
    def _retrying(self, what: str, attempt: Callable[[], object], *,
                  also_retry: frozenset[grpc.StatusCode] = frozenset()):
        delays = self.retry.delays()
        while True:
            try:
                return attempt()
            except (grpc.RpcError, grpc.FutureCancelledError) as e:  # the latter: our idle watchdog cancelled
                code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.CANCELLED
                detail = e.details() if isinstance(e, grpc.RpcError) else "cancelled: no bytes moved for too long"
                self._raise_if_identity_refused(what, code, detail, e)
                if code not in RETRYABLE | also_retry:
                    hint = " (check the silo's identity / certificate)" if code in FATAL_AUTH else ""
                    raise TransportError(f"{what} failed: {code.name}: {detail}{hint}", code) from e
                delay = next(delays, None)
                if delay is None:
                    raise TransportError(f"{what} failed after {self.retry.max_attempts} attempts: "
                                         f"{code.name}: {detail}", code) from e
                log.warning("silo %s: %s: %s (%s); retrying in %.1f s", self.silo, what, code.name, detail, delay)
                time.sleep(delay)
                self._connect()

    def _raise_if_identity_refused(self, what: str, code: grpc.StatusCode, detail: str | None,
                                   error: Exception) -> None:
        """gRPC reports a TLS handshake that fails over identity as UNAVAILABLE, like a server that
        is down; retrying cannot help then, so one standard-library handshake tells them apart."""
        if self._tls is None or code != grpc.StatusCode.UNAVAILABLE:
            return
        if not any(s in (detail or "").lower() for s in ("handshake", "socket closed", "ssl")):
            return
        reason = tls_refusal(self.address, self._tls)
        if reason:
            raise TransportError(f"{what} failed: {reason}", grpc.StatusCode.UNAUTHENTICATED) from error

    # ---- upload -----------------------------------------------------------------------------
    def query_upload(self, upload_id: str) -> tuple[dict[str, int], bool] | None:
        """Committed bytes per file and completeness, or None when the server has no such upload."""
        try:
            status = self.stub.QueryUpload(pb.QueryUploadRequest(upload_id=upload_id), metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return convert.upload_status_from_pb(status)

    def upload(self, folder: Path, manifest: Manifest, upload_id: str, *,
               on_chunk: Callable[[Chunk], None] | None = None) -> None:
        """Send a bundle, resuming from what the server holds after any drop. Idempotent.

        Only regular files inside `folder` are read (a link or special file raises BundleError
        before, or while, anything of it is sent: `crosslm_shared.bundle.open_regular`)."""
        for entry in manifest.files:
            open_regular(Path(folder) / entry.name).close()
        refused: list[BundleError] = []

        def attempt() -> None:
            held = self.query_upload(upload_id)
            committed, complete = held if held else ({}, False)
            # When the server says complete, a header-only stream still lets it confirm that
            # this id was registered with this very manifest (ALREADY_EXISTS otherwise).
            messages = _stop_on_refusal(self._upload_messages(folder, manifest, upload_id, committed, on_chunk),
                                        refused)
            calls: list[grpc.Future] = []
            watchdog = IdleWatchdog(self.idle_timeout_s, lambda: [c.cancel() for c in calls])
            try:
                calls.append(self._upload_call.future(_kicking(_only_first(messages) if complete else messages,
                                                              watchdog), metadata=self._metadata))
                status = calls[0].result()
            finally:
                watchdog.close()
            if refused:  # a file became a link while it was sent: stop, never retry
                raise refused[0]
            if not status.complete:
                raise TransportError(f"upload {upload_id} ended incomplete: "
                                     f"{convert.upload_status_from_pb(status)[0]}")
        # FAILED_PRECONDITION: the server still holds the previous stream, or an offset moved;
        # the next attempt asks again what is committed.
        self._retrying(f"upload {upload_id}", attempt, also_retry=frozenset({grpc.StatusCode.FAILED_PRECONDITION}))
        log.info("silo %s: upload %s complete (%d bytes)", self.silo, upload_id, manifest.total_size)

    def _upload_messages(self, folder, manifest, upload_id, committed, on_chunk) -> Iterator[pb.UploadRequest | Chunk]:
        yield pb.UploadRequest(header=pb.UploadHeader(upload_id=upload_id,
                                                      manifest=convert.manifest_to_pb(manifest)))
        for entry in manifest.files:
            offset = committed.get(entry.name, 0)
            if offset >= entry.size:
                continue
            for chunk in iter_chunks(folder / entry.name, name=entry.name, offset=offset,
                                     chunk_size=self.chunk_size):
                if on_chunk is not None:
                    on_chunk(chunk)
                yield chunk

    # ---- submissions ------------------------------------------------------------------------
    def submit(self, upload_id: str) -> Submission:
        # RESOURCE_EXHAUSTED on Submit means the queue is full: worth waiting for.
        return self._retrying(f"submit {upload_id}", lambda: convert.submission_from_pb(
            self.stub.Submit(pb.SubmitRequest(upload_id=upload_id), metadata=self._metadata)),
            also_retry=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))

    def get_submission(self, submission_id: str) -> Submission:
        return self._retrying(f"get {submission_id}", lambda: convert.submission_from_pb(
            self.stub.GetSubmission(pb.GetSubmissionRequest(submission_id=submission_id), metadata=self._metadata)))

    def list_submissions(self) -> list[Submission]:
        reply = self._retrying("list", lambda: self.stub.ListSubmissions(pb.ListSubmissionsRequest(),
                                                                          metadata=self._metadata))
        return [convert.submission_from_pb(s) for s in reply.submissions]

    def watch(self, submission_id: str, *, after_seq: int = 0) -> Iterator[Event]:
        """Events after `after_seq` until ready / failed, reconnecting without missing any."""
        last = after_seq
        delays = self.retry.delays()
        while True:
            try:
                for msg in self.stub.Watch(pb.WatchRequest(submission_id=submission_id, after_seq=last),
                                           metadata=self._metadata):
                    event = convert.event_from_pb(msg)
                    last = event.seq
                    delays = self.retry.delays()  # progress: the next drop starts a fresh backoff
                    yield event
                    if event.kind in TERMINAL_EVENTS:
                        return
                # The stream ended before ready / failed: the server let go; resume like after a drop.
                delay = next(delays, None)
                if delay is None:
                    raise TransportError(f"watch {submission_id}: the server kept ending the stream early")
                time.sleep(delay)
            except grpc.RpcError as e:
                self._raise_if_identity_refused(f"watch {submission_id}", e.code(), e.details(), e)
                delay = next(delays, None)
                if e.code() not in RETRYABLE or delay is None:
                    raise TransportError(f"watch {submission_id} failed: {e.code().name}: {e.details()}",
                                         e.code()) from e
                log.warning("silo %s: watch %s dropped (%s); resuming after event %d",
                            self.silo, submission_id, e.code().name, last)
                time.sleep(delay)
                self._connect()

    # ---- download ---------------------------------------------------------------------------
    def download(self, submission_id: str, result: Manifest, dest: Path) -> Path:
        """Fetch every file of the result bundle into `dest`, resuming partial files; verified."""
        dest.mkdir(parents=True, exist_ok=True)
        for entry in result.files:
            final = dest / entry.name
            if final.exists() and final.stat().st_size == entry.size:
                continue
            # not fsynced: after an OS crash the SHA-256 check catches a bad file and it is fetched again
            part = PartialFile(final, size=entry.size, sha256=entry.sha256, durable=False)

            def attempt(part=part, entry=entry) -> None:
                if not part.done:
                    stream = self._download_call(pb.DownloadRequest(submission_id=submission_id, file=entry.name,
                                                                    offset=part.committed), metadata=self._metadata)
                    with IdleWatchdog(self.idle_timeout_s, stream.cancel) as watchdog:
                        for chunk in stream:
                            watchdog.kick()
                            part.write(chunk)
                part.finish()
            try:
                self._retrying(f"download {submission_id}/{entry.name}", attempt)
            finally:
                part.close()
        return dest


def tls_refusal(address: str, tls: TlsFiles, *, timeout_s: float = 5.0) -> str:
    """Why the server at ``address`` and this silo's TLS files cannot agree, or "" when they can
    (or the server cannot be reached at all: that is a transient failure, not an identity one).

    A server that refuses the silo's certificate completes the TLS 1.3 handshake and then closes
    the connection (or sends an alert) instead of its HTTP/2 settings; a server certificate that
    the silo's CA did not sign fails verification here."""
    host, _, port = address.removeprefix("dns:///").rpartition(":")
    host = host.strip("[]") or "localhost"
    for attempt in range(2):  # a closed connection must repeat: a server shutting down closes one too
        reason = _tls_probe(host, port, tls, timeout_s)
        if not reason or reason.startswith("the server's certificate") or attempt:
            return reason
        time.sleep(1.0)
    return ""


def _tls_probe(host: str, port: str, tls: TlsFiles, timeout_s: float) -> str:
    try:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.cert), str(tls.key))
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=tls.server_name or host) as conn:
            conn.settimeout(timeout_s)
            first = conn.recv(1)
    except ssl.SSLCertVerificationError as e:
        return (f"the server's certificate is not trusted ({e.verify_message}): is [server] ca the CA "
                "that signed the server certificate, and the address a name in it?")
    except ssl.SSLError as e:
        if "alert" in str(e).lower():
            return (f"the server refused this silo's certificate ({e.reason}): is it signed by the CA "
                    "the server trusts?")
        return ""
    except (OSError, ValueError):
        return ""
    if not first:
        return ("the server closed the connection after the TLS handshake: it does not accept this silo's "
                "certificate (signed by another CA, expired, or revoked); ask the server's operator")
    return ""


def _stop_on_refusal(messages: Iterator, refused: list) -> Iterator:
    """End the stream (instead of letting grpc cancel it anonymously) when a file cannot be read
    as a regular file; the caller raises the BundleError kept in `refused`."""
    try:
        yield from messages
    except BundleError as e:
        refused.append(e)


def _kicking(messages: Iterator[pb.UploadRequest], watchdog: IdleWatchdog) -> Iterator[pb.UploadRequest]:
    """Kick the idle watchdog whenever gRPC takes the next message (i.e. the link moves)."""
    for message in messages:
        watchdog.kick()
        yield message


def _only_first(messages: Iterator[pb.UploadRequest]) -> Iterator[pb.UploadRequest]:
    yield next(messages)
