"""The chunk fast path of Upload and Download (crosslm_shared.convert): exactly protobuf's bytes
on the wire, the same message back, and protobuf's own answer for anything unexpected."""
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from crosslm_shared import convert
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.transfer import Chunk

chunks = st.builds(Chunk, file=st.text(max_size=30), offset=st.integers(0, 2**64 - 1),
                   data=st.binary(max_size=3000), crc32c=st.integers(0, 2**32 - 1))


def same(a: Chunk, b: Chunk) -> bool:
    return (a.file, a.offset, bytes(a.data), a.crc32c) == (b.file, b.offset, bytes(b.data), b.crc32c)


@given(chunks)
def test_encoding_is_protobufs_own(chunk):
    assert convert.upload_request_to_wire(chunk) == pb.UploadRequest(chunk=convert.chunk_to_pb(chunk)).SerializeToString()
    assert convert.chunk_to_wire(chunk) == convert.chunk_to_pb(chunk).SerializeToString()


@given(chunks)
def test_protobuf_bytes_decode_to_the_same_chunk(chunk):
    request = pb.UploadRequest(chunk=convert.chunk_to_pb(chunk)).SerializeToString()
    assert same(convert.upload_request_from_wire(request), chunk)
    assert same(convert.chunk_from_wire(convert.chunk_to_pb(chunk).SerializeToString()), chunk)


def test_a_header_stays_a_protobuf_message():
    header = pb.UploadRequest(header=pb.UploadHeader(upload_id="a-0000001"))
    decoded = convert.upload_request_from_wire(header.SerializeToString())
    assert isinstance(decoded, pb.UploadRequest) and decoded.header.upload_id == "a-0000001"
    assert convert.upload_request_to_wire(header) == header.SerializeToString()


def test_unknown_fields_and_repeated_fields_follow_protobuf():
    chunk = Chunk("model.safetensors", 5, b"abc", 7)
    with_unknown = convert.chunk_to_wire(chunk) + b"\x28\x01"  # field 5, varint: not in Chunk
    assert same(convert.chunk_from_wire(with_unknown), chunk)
    request = convert.upload_request_to_wire(chunk)
    twice = request + convert.upload_request_to_wire(Chunk("", 9, b"", 0))  # protobuf merges: offset 9 wins
    assert same(convert.upload_request_from_wire(twice), Chunk("model.safetensors", 9, b"abc", 7))
    header_then_chunk = pb.UploadRequest(header=pb.UploadHeader(upload_id="x" * 8)).SerializeToString() + request
    assert same(convert.upload_request_from_wire(header_then_chunk), chunk)  # the oneof's last member wins


@pytest.mark.parametrize("raw", [b"\x12\x05\x1a\x09abc", b"\x12", b"\x1a\xff", b"\x0a\x02\xff\xfe"])
def test_malformed_bytes_raise_like_protobuf(raw):
    with pytest.raises(DecodeError):
        pb.UploadRequest.FromString(raw) if raw.startswith(b"\x12") else pb.Chunk.FromString(raw)
    with pytest.raises(DecodeError):
        convert.upload_request_from_wire(raw) if raw.startswith(b"\x12") else convert.chunk_from_wire(raw)


def test_the_server_registers_every_method_of_the_service():
    from crosslm_server.service.servicer import CrossLMServicer, add_to_server

    class Recorder:  # stands in for grpc.Server: what add_to_server registers
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.service, self.methods = service, set(handlers)

    recorder = Recorder()
    add_to_server(CrossLMServicer(service=None, metrics=None, allow_dev_identity=True), recorder)
    service = pb.DESCRIPTOR.services_by_name["CrossLM"]
    assert recorder.service == service.full_name
    assert recorder.methods == {m.name for m in service.methods}
