"""Where the server's bundle bytes live, behind one small interface (docs/service.md, "Production
topology"): uploads being received, validated bundles, enhanced results and the rounds' work
folders. The store (SQLite, PostgreSQL) holds rows only, never bytes.

`SharedDir` is a folder: local disk for one process, or a volume every front-end and worker
mounts at once (NFS, a shared Docker volume) when they run apart. The engines and the transfer
code read and write real folders, so an object store (S3-compatible) implements this interface
as a local cache in front of the bucket: it fetches a bundle into `bundle_dir` before a round
and publishes `result_dir` and the adapters when a round ends; the database keeps only URIs.
"""
from __future__ import annotations

import abc
from pathlib import Path

KINDS = ("uploads", "bundles", "results", "work")


class BundleStorage(abc.ABC):
    """Folders by id; every process of one deployment must see the same bytes under them."""

    @abc.abstractmethod
    def upload_dir(self, upload_id: str) -> Path:
        """Files of an upload being received (`<file>.part` until its SHA-256 matched)."""

    @abc.abstractmethod
    def bundle_dir(self, upload_id: str) -> Path:
        """A complete, validated bundle (the upload folder renamed as one step)."""

    @abc.abstractmethod
    def result_dir(self, submission_id: str) -> Path:
        """The enhanced SLM of a round, ready to download."""

    @abc.abstractmethod
    def work_dir(self, submission_id: str) -> Path:
        """The engine's scratch folder of a round, kept across a rerun (on any worker)."""

    @abc.abstractmethod
    def uri(self, path: Path) -> str:
        """How a location is named in the database (`file://...` here)."""


class SharedDir(BundleStorage):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for kind in KINDS:
            (self.root / kind).mkdir(parents=True, exist_ok=True)

    def upload_dir(self, upload_id: str) -> Path:
        return self.root / "uploads" / upload_id

    def bundle_dir(self, upload_id: str) -> Path:
        return self.root / "bundles" / upload_id

    def result_dir(self, submission_id: str) -> Path:
        return self.root / "results" / submission_id

    def work_dir(self, submission_id: str) -> Path:
        return self.root / "work" / submission_id

    def uri(self, path: Path) -> str:
        return Path(path).resolve().as_uri()
