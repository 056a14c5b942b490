from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_QUEUED: _ClassVar[Stage]
    STAGE_RUNNING: _ClassVar[Stage]
    STAGE_READY: _ClassVar[Stage]
    STAGE_FAILED: _ClassVar[Stage]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_QUEUED: _ClassVar[EventKind]
    EVENT_KIND_STARTED: _ClassVar[EventKind]
    EVENT_KIND_RESUMED: _ClassVar[EventKind]
    EVENT_KIND_GENERATING: _ClassVar[EventKind]
    EVENT_KIND_SCORING: _ClassVar[EventKind]
    EVENT_KIND_SCORER_DROPPED: _ClassVar[EventKind]
    EVENT_KIND_TRAINING_LLM: _ClassVar[EventKind]
    EVENT_KIND_FILTERING: _ClassVar[EventKind]
    EVENT_KIND_TRAINING_SLM: _ClassVar[EventKind]
    EVENT_KIND_EVALUATING_LLM: _ClassVar[EventKind]
    EVENT_KIND_READY: _ClassVar[EventKind]
    EVENT_KIND_FAILED: _ClassVar[EventKind]
STAGE_UNSPECIFIED: Stage
STAGE_QUEUED: Stage
STAGE_RUNNING: Stage
STAGE_READY: Stage
STAGE_FAILED: Stage
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_QUEUED: EventKind
EVENT_KIND_STARTED: EventKind
EVENT_KIND_RESUMED: EventKind
EVENT_KIND_GENERATING: EventKind
EVENT_KIND_SCORING: EventKind
EVENT_KIND_SCORER_DROPPED: EventKind
EVENT_KIND_TRAINING_LLM: EventKind
EVENT_KIND_FILTERING: EventKind
EVENT_KIND_TRAINING_SLM: EventKind
EVENT_KIND_EVALUATING_LLM: EventKind
EVENT_KIND_READY: EventKind
EVENT_KIND_FAILED: EventKind

class FileEntry(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("task", "silo", "arch", "labels", "temperature", "heldout_accuracy", "files")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    task: str
    silo: str
    arch: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    heldout_accuracy: float
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, task: _Optional[str] = ..., silo: _Optional[str] = ..., arch: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., heldout_accuracy: _Optional[float] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("upload_id", "manifest")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    manifest: Manifest
    def __init__(self, upload_id: _Optional[str] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("file", "offset", "data", "crc32c")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class FileProgress(_message.Message):
    __slots__ = ("name", "committed", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    committed: int
    size: int
    def __init__(self, name: _Optional[str] = ..., committed: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("upload_id", "files", "complete")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    files: _containers.RepeatedCompositeFieldContainer[FileProgress]
    complete: bool
    def __init__(self, upload_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileProgress, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class DoubleList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("double", "int", "string", "bool", "double_list", "int_list", "string_list")
    DOUBLE_FIELD_NUMBER: _ClassVar[int]
    INT_FIELD_NUMBER: _ClassVar[int]
    STRING_FIELD_NUMBER: _ClassVar[int]
    BOOL_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_LIST_FIELD_NUMBER: _ClassVar[int]
    INT_LIST_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    double: float
    int: int
    string: str
    bool: bool
    double_list: DoubleList
    int_list: IntList
    string_list: StringList
    def __init__(self, double: _Optional[float] = ..., int: _Optional[int] = ..., string: _Optional[str] = ..., bool: _Optional[bool] = ..., double_list: _Optional[_Union[DoubleList, _Mapping]] = ..., int_list: _Optional[_Union[IntList, _Mapping]] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("submission_id", "upload_id", "silo", "task", "stage", "error", "created_at", "updated_at", "result", "metrics", "typed_stage", "typed_metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TypedMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TYPED_STAGE_FIELD_NUMBER: _ClassVar[int]
    TYPED_METRICS_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    upload_id: str
    silo: str
    task: str
    stage: str
    error: str
    created_at: float
    updated_at: float
    result: Manifest
    metrics: _containers.ScalarMap[str, str]
    typed_stage: Stage
    typed_metrics: _containers.MessageMap[str, Value]
    def __init__(self, submission_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., silo: _Optional[str] = ..., task: _Optional[str] = ..., stage: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., result: _Optional[_Union[Manifest, _Mapping]] = ..., metrics: _Optional[_Mapping[str, str]] = ..., typed_stage: _Optional[_Union[Stage, str]] = ..., typed_metrics: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("submission_id", "after_seq")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    after_seq: int
    def __init__(self, submission_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("submission_id", "seq", "kind", "time", "fields", "typed_kind", "typed_fields")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TypedFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    TYPED_KIND_FIELD_NUMBER: _ClassVar[int]
    TYPED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    seq: int
    kind: str
    time: float
    fields: _containers.ScalarMap[str, str]
    typed_kind: EventKind
    typed_fields: _containers.MessageMap[str, Value]
    def __init__(self, submission_id: _Optional[str] = ..., seq: _Optional[int] = ..., kind: _Optional[str] = ..., time: _Optional[float] = ..., fields: _Optional[_Mapping[str, str]] = ..., typed_kind: _Optional[_Union[EventKind, str]] = ..., typed_fields: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("submission_id", "file", "offset", "chunk_size")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    file: str
    offset: int
    chunk_size: int
    def __init__(self, submission_id: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetSubmissionRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class ListSubmissionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSubmissionsResponse(_message.Message):
    __slots__ = ("submissions",)
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    submissions: _containers.RepeatedCompositeFieldContainer[Submission]
    def __init__(self, submissions: _Optional[_Iterable[_Union[Submission, _Mapping]]] = ...) -> None: ...
