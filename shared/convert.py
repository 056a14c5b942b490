"""The one place that converts protobuf messages to and from CrossLM's frozen records.

Everything past the servicer and the client's transport works on dataclasses only.
Manifests also round-trip through JSON here (the store keeps them as JSON text).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from crosslm_shared.bundle import FileEntry, Manifest
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.records import Event, Submission, Upload
from crosslm_shared.transfer import Chunk


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


def upload_status_to_pb(upload: Upload, committed: Mapping[str, int]) -> pb.UploadStatus:
    files = [pb.FileProgress(name=f.name, committed=committed.get(f.name, 0), size=f.size)
             for f in upload.manifest.files]
    return pb.UploadStatus(upload_id=upload.upload_id, files=files, complete=upload.complete)


def upload_status_from_pb(msg: pb.UploadStatus) -> tuple[dict[str, int], bool]:
    """(committed bytes per file, complete)."""
    return {f.name: f.committed for f in msg.files}, msg.complete


def submission_to_pb(s: Submission) -> pb.Submission:
    msg = pb.Submission(submission_id=s.submission_id, upload_id=s.upload_id, silo=s.silo,
                        task=s.task, stage=s.stage, error=s.error, created_at=s.created_at,
                        updated_at=s.updated_at, metrics=dict(s.metrics))
    if s.result is not None:
        msg.result.CopyFrom(manifest_to_pb(s.result))
    return msg


def submission_from_pb(msg: pb.Submission) -> Submission:
    return Submission(submission_id=msg.submission_id, upload_id=msg.upload_id, silo=msg.silo,
                      task=msg.task, stage=msg.stage, error=msg.error, created_at=msg.created_at,
                      updated_at=msg.updated_at, metrics=dict(msg.metrics),
                      result=manifest_from_pb(msg.result) if msg.HasField("result") else None)


def submission_to_dict(s: Submission) -> dict[str, Any]:
    return {"submission_id": s.submission_id, "upload_id": s.upload_id, "silo": s.silo,
            "task": s.task, "stage": s.stage, "error": s.error, "created_at": s.created_at,
            "updated_at": s.updated_at, "metrics": dict(s.metrics),
            "result": manifest_to_dict(s.result) if s.result else None}


def event_to_pb(e: Event) -> pb.Event:
    return pb.Event(submission_id=e.submission_id, seq=e.seq, kind=e.kind, time=e.time,
                    fields=dict(e.fields))


def event_from_pb(msg: pb.Event) -> Event:
    return Event(submission_id=msg.submission_id, seq=msg.seq, kind=msg.kind, time=msg.time,
                 fields=dict(msg.fields))


def stringify_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Event fields and metrics travel as strings; floats keep 6 significant digits."""
    return {str(k): (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
