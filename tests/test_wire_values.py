"""Typed metrics and event fields, stage and event-kind enums (crosslm.v1 fields 11-12 / 6-7),
and the compatibility both ways with the string-only wire of clients and servers before them."""
import json
import math

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

from crosslm_client.transport import CrossLMClient
from crosslm_shared import convert
from crosslm_shared.errors import RecordValueError
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.records import Event, EventKind, Stage, Submission, typed_value, typed_values
from service_helpers import address, round_trip, server_config, start_server, tiny_bundle

THIRD = 1 / 3
VALUES = {"losses": [0.1, THIRD, 1e-300, -2.5e300], "step": 2**62 + 1, "negative": -7, "kept": 3, "updated": True,
          "ratio": 0.1 + 0.2, "note": "no sample kept", "hist": [0, 5, 2**40], "names": ["neg", "pos"], "none": [],
          "kl": math.nan, "ppl": math.inf}

# The messages as crosslm.v1 had them before typed values (what a client or server of then was built from).
OLD_PROTO = """
syntax = "proto3";
package crosslm.v1;
message FileEntry { string name = 1; uint64 size = 2; string sha256 = 3; }
message Manifest {
  string task = 1; string silo = 2; string arch = 3; repeated string labels = 4;
  double temperature = 5; double heldout_accuracy = 6; repeated FileEntry files = 7;
}
message Submission {
  string submission_id = 1; string upload_id = 2; string silo = 3; string task = 4; string stage = 5;
  string error = 6; double created_at = 7; double updated_at = 8; Manifest result = 9;
  map<string, string> metrics = 10;
}
message WatchRequest { string submission_id = 1; uint64 after_seq = 2; }
message Event {
  string submission_id = 1; uint64 seq = 2; string kind = 3; double time = 4; map<string, string> fields = 5;
}
message GetSubmissionRequest { string submission_id = 1; }
"""


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """Message classes built from OLD_PROTO in a pool of their own (the new ones share the names)."""
    root = tmp_path_factory.mktemp("old_proto")
    (root / "old.proto").write_text(OLD_PROTO)
    assert protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={root / 'old.pb'}", "old.proto"]) == 0
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString((root / "old.pb").read_bytes()).file:
        pool.Add(f)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"crosslm.v1.{name}"))


def assert_typed(got, want=VALUES):
    """Equal values of equal types (lists arrive as tuples; NaN is NaN)."""
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert isinstance(got[key], float) and math.isnan(got[key]), key
            continue
        expected = typed_value(key, value)
        assert got[key] == expected and type(got[key]) is type(expected), (key, got[key])
        if isinstance(expected, tuple):
            assert [type(x) for x in got[key]] == [type(x) for x in expected], key


def test_typed_values_keep_their_type_and_every_bit():
    values = typed_values(VALUES)
    assert values["losses"] == (0.1, THIRD, 1e-300, -2.5e300) and values["step"] == 2**62 + 1
    assert values["updated"] is True and values["none"] == () and values["hist"] == (0, 5, 2**40)
    assert typed_value("mixed", [1, 2.5]) == (1.0, 2.5) and type(typed_value("mixed", [1, 2.5])[0]) is float
    np = pytest.importorskip("numpy")
    assert type(typed_value("n", np.int64(3))) is int and type(typed_value("f", np.float32(0.5))) is float
    assert typed_value("l", np.arange(3).tolist()) == (0, 1, 2)


@pytest.mark.parametrize("bad", [{"a": 1}, [1, "a"], [[1]], [True], None, 2**63, b"x"])
def test_a_value_the_wire_cannot_carry_is_refused_by_name(bad):
    with pytest.raises(RecordValueError, match="'odd'"):
        typed_values({"odd": bad})


def test_submission_and_event_round_trip_typed_through_protobuf_bytes():
    sub = Submission("sub-1", "up-1", "a", "rt", Stage.READY, 1.0, 2.0, metrics=VALUES)
    back = convert.submission_from_pb(pb.Submission.FromString(convert.submission_to_pb(sub).SerializeToString()))
    assert back.stage is Stage.READY
    assert_typed(back.metrics)
    event = Event("sub-1", 4, EventKind.TRAINING_LLM, 3.0, VALUES)
    msg = pb.Event.FromString(convert.event_to_pb(event).SerializeToString())
    assert msg.typed_kind == pb.EVENT_KIND_TRAINING_LLM and msg.typed_fields["losses"].HasField("double_list")
    back = convert.event_from_pb(msg)
    assert back.kind is EventKind.TRAINING_LLM
    assert_typed(back.fields)


def test_the_proto_enums_mirror_the_python_ones():
    assert {n for n in pb.Stage.keys() if n != "STAGE_UNSPECIFIED"} == {f"STAGE_{s.name}" for s in Stage}
    assert ({n for n in pb.EventKind.keys() if n != "EVENT_KIND_UNSPECIFIED"}
            == {f"EVENT_KIND_{k.name}" for k in EventKind})


def test_the_deprecated_string_maps_are_filled_as_before_and_read_by_an_old_client(old):
    sub = Submission("sub-1", "up-1", "a", "rt", Stage.RUNNING, 1.0, 2.0, metrics=VALUES)
    legacy = old("Submission").FromString(convert.submission_to_pb(sub).SerializeToString())
    assert legacy.stage == "running"
    assert dict(legacy.metrics) == {"losses": "0.1,0.333333,1e-300,-2.5e+300", "step": str(2**62 + 1),
                                    "negative": "-7", "kept": "3", "updated": "True", "ratio": "0.3",
                                    "note": "no sample kept", "hist": "0,5,1099511627776", "names": "neg,pos",
                                    "none": "", "kl": "nan", "ppl": "inf"}
    event = old("Event").FromString(convert.event_to_pb(Event("sub-1", 1, EventKind.QUEUED, 3.0,
                                                                    {"position": 2, "rerun": True})).SerializeToString())
    assert (event.kind, dict(event.fields)) == ("queued", {"position": "2", "rerun": "True"})


def test_a_new_client_reads_an_old_server_and_an_unknown_kind(old):
    """An old server fills only the string fields: they arrive as strings, never parsed."""
    Old = old("Submission")
    msg = Old(submission_id="s", upload_id="u", silo="a", task="rt", stage="ready", metrics={"kl": "0.1"})
    sub = convert.submission_from_pb(pb.Submission.FromString(msg.SerializeToString()))
    assert sub.stage is Stage.READY and dict(sub.metrics) == {"kl": "0.1"}
    event = convert.event_from_pb(pb.Event.FromString(
        old("Event")(submission_id="s", seq=1, kind="generating", fields={"k": "5"}).SerializeToString()))
    assert event.kind is EventKind.GENERATING and dict(event.fields) == {"k": "5"}
    newer = convert.event_from_pb(pb.Event(submission_id="s", seq=2, kind="distilling", typed_kind=99))
    assert newer.kind == "distilling"  # a kind from a newer server stays its name


def test_the_http_view_is_strict_json():
    sub = Submission("sub-1", "up-1", "a", "rt", Stage.READY, 1.0, 2.0, metrics=VALUES)
    view = json.loads(json.dumps(convert.submission_to_dict(sub), allow_nan=False))
    assert view["stage"] == "ready" and view["metrics"]["kl"] is None and view["metrics"]["ppl"] is None
    assert view["metrics"]["losses"] == [0.1, THIRD, 1e-300, -2.5e300] and view["metrics"]["step"] == 2**62 + 1


class _TypedEngine:
    """Emits one event and returns metrics with every type the wire carries."""

    def ready(self):
        return True

    def run_round(self, request, emit):
        from crosslm_server.engines.api import RoundOutcome

        emit(EventKind.TRAINING_LLM, VALUES)
        return RoundOutcome(request.slm_dir, VALUES)


class _TypoEngine(_TypedEngine):
    def run_round(self, request, emit):
        emit("generatin", {"done": 1, "total": 2})


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_typed_values_travel_engine_to_client_and_old_clients_still_read(tmp_path, old, store):
    server = start_server(server_config(tmp_path / "server", store=store), engine_factory=_TypedEngine)
    try:
        with CrossLMClient(address(server), "a") as client:
            done, events = round_trip(client, *tiny_bundle(tmp_path / "silo"), "a-typed-0001")
        assert [e.kind for e in events] == [EventKind.QUEUED, EventKind.STARTED, EventKind.TRAINING_LLM, EventKind.READY]
        assert events[0].fields["position"] == 1 and events[-1].fields["files"] == len(done.result.files)
        assert_typed(events[2].fields)
        assert done.stage is Stage.READY
        assert_typed(done.metrics)
        with grpc.insecure_channel(address(server)) as channel:  # a client built from the old proto
            md = ((convert.SILO_METADATA_KEY, "a"),)
            get = channel.unary_unary("/crosslm.v1.CrossLM/GetSubmission",
                                      request_serializer=old("GetSubmissionRequest").SerializeToString,
                                      response_deserializer=old("Submission").FromString)
            watch = channel.unary_stream("/crosslm.v1.CrossLM/Watch",
                                         request_serializer=old("WatchRequest").SerializeToString,
                                         response_deserializer=old("Event").FromString)
            legacy = get(old("GetSubmissionRequest")(submission_id=done.submission_id), metadata=md)
            legacy_events = list(watch(old("WatchRequest")(submission_id=done.submission_id), metadata=md))
        assert legacy.stage == "ready" and legacy.metrics["losses"] == "0.1,0.333333,1e-300,-2.5e+300"
        assert legacy.metrics["step"] == str(2**62 + 1) and legacy.metrics["updated"] == "True"
        assert [e.kind for e in legacy_events] == ["queued", "started", "training_llm", "ready"]
        assert legacy_events[0].fields["position"] == "1" and legacy_events[2].fields["hist"] == "0,5,1099511627776"
    finally:
        server.stop(grace=1)


def test_an_engine_event_of_no_known_kind_fails_the_round_by_name(tmp_path):
    server = start_server(server_config(tmp_path / "server", store="memory"), engine_factory=_TypoEngine)
    try:
        with CrossLMClient(address(server), "a") as client:
            done, events = round_trip(client, *tiny_bundle(tmp_path / "silo"), "a-typo-00001")
        assert done.stage is Stage.FAILED
        assert events[-1].kind is EventKind.FAILED and "'generatin'" in events[-1].fields["reason"]
    finally:
        server.stop(grace=1)
