from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("tensors", "total_bytes")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PayloadChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PayloadTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    def __init__(self, sha256: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "client_name", "partition_index", "device", "num_examples", "own_data", "lora_rank")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    OWN_DATA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_name: str
    partition_index: int
    device: str
    num_examples: int
    own_data: bool
    lora_rank: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_name: _Optional[str] = ..., partition_index: _Optional[int] = ..., device: _Optional[str] = ..., num_examples: _Optional[int] = ..., own_data: _Optional[bool] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("protocol_version", "client_id", "run_config_json", "partition_index", "num_partitions", "partition_fingerprint", "run_id", "heartbeat_interval_ms", "lora_rank")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    run_config_json: str
    partition_index: int
    num_partitions: int
    partition_fingerprint: str
    run_id: str
    heartbeat_interval_ms: int
    lora_rank: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., run_config_json: _Optional[str] = ..., partition_index: _Optional[int] = ..., num_partitions: _Optional[int] = ..., partition_fingerprint: _Optional[str] = ..., run_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("protocol_version", "client_id", "base_residual_round")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_RESIDUAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    base_residual_round: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., base_residual_round: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("protocol_version", "round", "method", "round_seed", "payload", "base_residual_round")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUND_SEED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BASE_RESIDUAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    method: str
    round_seed: int
    payload: PayloadHeader
    base_residual_round: int
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., method: _Optional[str] = ..., round_seed: _Optional[int] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ..., base_residual_round: _Optional[int] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RunFinished(_message.Message):
    __slots__ = ("rounds_completed", "reason")
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rounds_completed: int
    reason: str
    def __init__(self, rounds_completed: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer", "wait", "finished")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: PayloadChunk
    trailer: PayloadTrailer
    wait: Wait
    finished: RunFinished
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[PayloadChunk, _Mapping]] = ..., trailer: _Optional[_Union[PayloadTrailer, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., finished: _Optional[_Union[RunFinished, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("protocol_version", "client_id", "round", "num_examples", "train_loss", "train_seconds", "local_steps", "payload")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    round: int
    num_examples: int
    train_loss: float
    train_seconds: float
    local_steps: int
    payload: PayloadHeader
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_seconds: _Optional[float] = ..., local_steps: _Optional[int] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: PayloadChunk
    trailer: PayloadTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[PayloadChunk, _Mapping]] = ..., trailer: _Optional[_Union[PayloadTrailer, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("protocol_version", "client_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class KeepAliveReply(_message.Message):
    __slots__ = ("message", "run_over")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RUN_OVER_FIELD_NUMBER: _ClassVar[int]
    message: str
    run_over: bool
    def __init__(self, message: _Optional[str] = ..., run_over: _Optional[bool] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("message", "bytes_received")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    message: str
    bytes_received: int
    def __init__(self, message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("name", "state", "reason", "seconds_since_keepalive", "rounds_participated", "partition", "num_examples", "lora_rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PARTICIPATED_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    reason: str
    seconds_since_keepalive: float
    rounds_participated: int
    partition: int
    num_examples: int
    lora_rank: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., seconds_since_keepalive: _Optional[float] = ..., rounds_participated: _Optional[int] = ..., partition: _Optional[int] = ..., num_examples: _Optional[int] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "method", "round", "num_rounds", "rounds_completed", "phase", "elapsed_seconds", "eta_seconds", "clients", "finished_reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    method: str
    round: int
    num_rounds: int
    rounds_completed: int
    phase: str
    elapsed_seconds: float
    eta_seconds: float
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    finished_reason: str
    def __init__(self, run_id: _Optional[str] = ..., method: _Optional[str] = ..., round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., phase: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., finished_reason: _Optional[str] = ...) -> None: ...
