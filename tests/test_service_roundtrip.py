"""One silo over real localhost gRPC: upload -> queue -> round -> watch -> download."""

import pytest

from crosslm_client.transport import CrossLMClient, TransportError
from crosslm_shared.bundle import sha256_file
from service_helpers import address, server_config, start_server, tiny_bundle


@pytest.fixture
def server(tmp_path):
    s = start_server(server_config(tmp_path / "server"))
    yield s
    s.stop(grace=2)


def test_round_trip(server, tmp_path):
    folder, manifest = tiny_bundle(tmp_path / "silo")
    with CrossLMClient(address(server), "a") as client:
        client.upload(folder, manifest, "a-upload-0001")
        sub = client.submit("a-upload-0001")
        assert client.submit("a-upload-0001").submission_id == sub.submission_id
        events = list(client.watch(sub.submission_id))
        kinds = [e.kind for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "ready", kinds
        assert {"started", "generating", "scoring", "training_llm", "training_slm"} <= set(kinds)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        done = client.get_submission(sub.submission_id)
        assert done.stage == "ready" and done.result is not None
        out = client.download(sub.submission_id, done.result, tmp_path / "back")
        for entry in done.result.files:
            assert sha256_file(out / entry.name) == entry.sha256
        assert [s.submission_id for s in client.list_submissions()] == [sub.submission_id]
        later = list(client.watch(sub.submission_id, after_seq=events[-3].seq))
        assert [e.seq for e in later] == [events[-2].seq, events[-1].seq]


def test_other_silos_see_nothing(server, tmp_path):
    folder, manifest = tiny_bundle(tmp_path / "silo")
    with CrossLMClient(address(server), "a") as a, CrossLMClient(address(server), "b") as b:
        a.upload(folder, manifest, "a-upload-0002")
        sub = a.submit("a-upload-0002")
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):
            b.get_submission(sub.submission_id)
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):
            b.upload(folder, manifest, "b-upload-0001")  # manifest names silo a
        assert b.list_submissions() == []
