"""The one place that converts protobuf messages to and from CrossLM's frozen records.

Everything past the servicer and the client's transport works on dataclasses only.
Manifests also round-trip through JSON here (the store keeps them as JSON text). Metrics and
event fields travel typed (crosslm.v1.Value) and, for clients from before typed values, also in
the deprecated string maps, which this module fills and never parses back.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from crosslm_shared.bundle import FileEntry, Manifest
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.records import Event, EventKind, Stage, Submission, Upload, Value
from crosslm_shared.transfer import Chunk

# plaintext dev mode only: the silo names itself in this gRPC metadata header (under mTLS the
# certificate's CN is the identity and the header is ignored)
SILO_METADATA_KEY = "x-crosslm-silo"


def manifest_to_pb(m: Manifest) -> pb.Manifest:
    return pb.Manifest(task=m.task, silo=m.silo, arch=m.arch, labels=list(m.labels),
                       temperature=m.temperature, heldout_accuracy=m.heldout_accuracy,
                       files=[pb.FileEntry(name=f.name, size=f.size, sha256=f.sha256) for f in m.files])


def manifest_from_pb(msg: pb.Manifest) -> Manifest:
    return Manifest(task=msg.task, silo=msg.silo, arch=msg.arch, labels=tuple(msg.labels),
                    temperature=msg.temperature, heldout_accuracy=msg.heldout_accuracy,
                    files=tuple(FileEntry(f.name, f.size, f.sha256) for f in msg.files))


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    return {"task": m.task, "silo": m.silo, "arch": m.arch, "labels": list(m.labels),
            "temperature": m.temperature, "heldout_accuracy": m.heldout_accuracy,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in m.files]}


def manifest_from_dict(d: Mapping[str, Any]) -> Manifest:
    return Manifest(task=d["task"], silo=d["silo"], arch=d["arch"], labels=tuple(d["labels"]),
                    temperature=float(d["temperature"]), heldout_accuracy=float(d["heldout_accuracy"]),
                    files=tuple(FileEntry(f["name"], int(f["size"]), f["sha256"]) for f in d["files"]))


def manifest_to_json(m: Manifest) -> str:
    return json.dumps(manifest_to_dict(m), sort_keys=True)


def manifest_from_json(text: str) -> Manifest:
    return manifest_from_dict(json.loads(text))


def chunk_to_pb(c: Chunk) -> pb.Chunk:
    return pb.Chunk(file=c.file, offset=c.offset, data=c.data, crc32c=c.crc32c)


def chunk_from_pb(msg: pb.Chunk) -> Chunk:
    return Chunk(file=msg.file, offset=msg.offset, data=msg.data, crc32c=msg.crc32c)


# ---- the chunk fast path ---------------------------------------------------------------------
# Upload and Download move a model as 1 MiB chunks. Through protobuf objects each chunk's bytes
# are copied twice more than a bare grpc stream copies them (build + serialize; parse + read
# the field), which cost CrossLM over half its throughput (docs/performance.md). These codecs
# are the grpc (de)serializers of those two calls: they write exactly protobuf's encoding of the
# same message, and read a chunk's data, with one copy each. Any message they do not expect
# (a header, unknown fields, malformed bytes) goes through protobuf.
_CHUNK_IN_REQUEST = 0x12  # UploadRequest.chunk: field 2, length-delimited
_FILE, _OFFSET, _DATA, _CRC = 0x0A, 0x10, 0x1A, 0x20  # Chunk fields 1-4 with their wire types


class _NotFastPath(Exception):
    pass


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _NotFastPath


def _chunk_wire_parts(c: Chunk) -> tuple[bytes, bytes | memoryview, bytes]:
    """(head, data, tail) of protobuf's encoding of a Chunk: fields in order, defaults left out."""
    name = c.file.encode()
    head = bytes([_FILE]) + _varint(len(name)) + name if name else b""
    head += bytes([_OFFSET]) + _varint(c.offset) if c.offset else b""
    head += bytes([_DATA]) + _varint(len(c.data)) if len(c.data) else b""
    tail = bytes([_CRC]) + _varint(c.crc32c) if c.crc32c else b""
    return head, c.data, tail


def chunk_to_wire(c: Chunk | pb.Chunk) -> bytes:
    """A Download response: the encoding of pb.Chunk, with one copy of the data."""
    if isinstance(c, pb.Chunk):
        return c.SerializeToString()
    return b"".join(_chunk_wire_parts(c))


def upload_request_to_wire(m: Chunk | pb.UploadRequest) -> bytes:
    """An Upload message: a header as protobuf writes it; a chunk as UploadRequest{chunk}, one copy."""
    if isinstance(m, pb.UploadRequest):
        return m.SerializeToString()
    head, data, tail = _chunk_wire_parts(m)
    size = len(head) + len(data) + len(tail)
    return b"".join((bytes([_CHUNK_IN_REQUEST]) + _varint(size) + head, data, tail))


def _parse_chunk(raw: bytes, pos: int, end: int) -> Chunk:
    file, offset, data, crc = "", 0, b"", 0
    while pos < end:
        tag = raw[pos]
        if tag == _DATA or tag == _FILE:
            n, start = _read_varint(raw, pos + 1, end)
            if start + n > end:
                raise _NotFastPath
            if tag == _DATA:
                data = raw[start:start + n]  # the one copy: google-crc32c's C code takes bytes only
            else:
                try:
                    file = raw[start:start + n].decode()
                except UnicodeDecodeError as e:
                    raise _NotFastPath from e
            pos = start + n
        elif tag == _OFFSET or tag == _CRC:
            value, pos = _read_varint(raw, pos + 1, end)
            if tag == _CRC:
                crc = value & 0xFFFFFFFF  # protobuf keeps the low 32 bits of a uint32 varint
            elif value >> 64:
                raise _NotFastPath
            else:
                offset = value
        else:
            raise _NotFastPath
    return Chunk(file=file, offset=offset, data=data, crc32c=crc)


def chunk_from_wire(raw: bytes) -> Chunk:
    """A Download response as a Chunk."""
    try:
        return _parse_chunk(raw, 0, len(raw))
    except _NotFastPath:
        return chunk_from_pb(pb.Chunk.FromString(raw))


def upload_request_from_wire(raw: bytes) -> Chunk | pb.UploadRequest:
    """An Upload message: a chunk as a Chunk, anything else as protobuf."""
    try:
        if raw[:1] == bytes([_CHUNK_IN_REQUEST]):
            size, start = _read_varint(raw, 1, len(raw))
            if start + size == len(raw):
                return _parse_chunk(raw, start, len(raw))
    except _NotFastPath:
        pass
    msg = pb.UploadRequest.FromString(raw)
    return chunk_from_pb(msg.chunk) if msg.WhichOneof("kind") == "chunk" else msg


def upload_status_to_pb(upload: Upload, committed: Mapping[str, int]) -> pb.UploadStatus:
    files = [pb.FileProgress(name=f.name, committed=committed.get(f.name, 0), size=f.size)
             for f in upload.manifest.files]
    return pb.UploadStatus(upload_id=upload.upload_id, files=files, complete=upload.complete)


def upload_status_from_pb(msg: pb.UploadStatus) -> tuple[dict[str, int], bool]:
    """(committed bytes per file, complete)."""
    return {f.name: f.committed for f in msg.files}, msg.complete


# ---- stages, event kinds and typed values ----------------------------------------------------
# The proto enums mirror Stage and EventKind member for member (STAGE_<NAME>, EVENT_KIND_<NAME>);
# building these tables fails at import if a Python member has no proto twin.
_PB_STAGE = {stage: pb.Stage.Value(f"STAGE_{stage.name}") for stage in Stage}
_STAGE_OF = {number: stage for stage, number in _PB_STAGE.items()}
_PB_KIND = {kind: pb.EventKind.Value(f"EVENT_KIND_{kind.name}") for kind in EventKind}
_KIND_OF = {number: kind for kind, number in _PB_KIND.items()}
_LISTS = ("double_list", "int_list", "string_list")


def value_to_pb(v: Value) -> pb.Value:
    """A typed value (crosslm_shared.records.typed_value) as crosslm.v1.Value."""
    if isinstance(v, bool):
        return pb.Value(bool=v)
    if isinstance(v, int):
        return pb.Value(int=v)
    if isinstance(v, float):
        return pb.Value(double=v)
    if isinstance(v, str):
        return pb.Value(string=v)
    if v and isinstance(v[0], str):
        return pb.Value(string_list=pb.StringList(values=v))
    if v and isinstance(v[0], int):
        return pb.Value(int_list=pb.IntList(values=v))
    return pb.Value(double_list=pb.DoubleList(values=v))


def value_from_pb(msg: pb.Value) -> Value | None:
    """The value a crosslm.v1.Value holds; None when it holds a type this code does not know."""
    kind = msg.WhichOneof("kind")
    if kind in _LISTS:
        return tuple(getattr(msg, kind).values)
    return None if kind is None else getattr(msg, kind)


def legacy_string(v: Value) -> str:
    """How the deprecated string maps carry a value (what clients from before typed values parse):
    floats with 6 significant digits, lists comma-joined, booleans True / False."""
    if isinstance(v, tuple):
        return ",".join(legacy_string(x) for x in v)
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _values_to_pb(values: Mapping[str, Value], typed, legacy) -> None:
    for key, v in values.items():
        typed[key].CopyFrom(value_to_pb(v))
        legacy[key] = legacy_string(v)


def _values_from_pb(typed, legacy) -> dict[str, Value]:
    """The typed map; a key only in the string map (a server from before typed values, or a type
    this code cannot read) keeps its string, never parsed."""
    out: dict[str, Value] = dict(legacy)
    for key, msg in typed.items():
        v = value_from_pb(msg)
        if v is not None:
            out[key] = v
    return out


def _json_safe(v: Value) -> Any:
    """JSON has no NaN or infinity: those become null (the HTTP view)."""
    if isinstance(v, tuple):
        return [_json_safe(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ---- submissions and events ------------------------------------------------------------------
def submission_to_pb(s: Submission) -> pb.Submission:
    msg = pb.Submission(submission_id=s.submission_id, upload_id=s.upload_id, silo=s.silo,
                        task=s.task, stage=s.stage.value, typed_stage=_PB_STAGE[s.stage], error=s.error,
                        created_at=s.created_at, updated_at=s.updated_at)
    _values_to_pb(s.metrics, msg.typed_metrics, msg.metrics)
    if s.result is not None:
        msg.result.CopyFrom(manifest_to_pb(s.result))
    return msg


def submission_from_pb(msg: pb.Submission) -> Submission:
    return Submission(submission_id=msg.submission_id, upload_id=msg.upload_id, silo=msg.silo,
                      task=msg.task, stage=_STAGE_OF.get(msg.typed_stage) or Stage(msg.stage), error=msg.error,
                      created_at=msg.created_at, updated_at=msg.updated_at,
                      metrics=_values_from_pb(msg.typed_metrics, msg.metrics),
                      result=manifest_from_pb(msg.result) if msg.HasField("result") else None)


def submission_to_dict(s: Submission) -> dict[str, Any]:
    """The HTTP view's JSON: typed metrics as JSON values (non-finite floats as null)."""
    return {"submission_id": s.submission_id, "upload_id": s.upload_id, "silo": s.silo,
            "task": s.task, "stage": s.stage.value, "error": s.error, "created_at": s.created_at,
            "updated_at": s.updated_at, "metrics": {k: _json_safe(v) for k, v in s.metrics.items()},
            "result": manifest_to_dict(s.result) if s.result else None}


def event_to_pb(e: Event) -> pb.Event:
    msg = pb.Event(submission_id=e.submission_id, seq=e.seq, kind=str(e.kind), time=e.time,
                   typed_kind=_PB_KIND.get(e.kind, pb.EVENT_KIND_UNSPECIFIED))
    _values_to_pb(e.fields, msg.typed_fields, msg.fields)
    return msg


def event_from_pb(msg: pb.Event) -> Event:
    return Event(submission_id=msg.submission_id, seq=msg.seq, kind=_KIND_OF.get(msg.typed_kind) or msg.kind,
                 time=msg.time, fields=_values_from_pb(msg.typed_fields, msg.fields))
