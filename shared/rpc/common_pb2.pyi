import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Progress(_message.Message):
    __slots__ = ("phase", "step", "total", "loss", "seconds_per_step", "message", "learning_rate", "data_wait_fraction")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DATA_WAIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total: int
    loss: float
    seconds_per_step: float
    message: str
    learning_rate: float
    data_wait_fraction: float
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., loss: _Optional[float] = ..., seconds_per_step: _Optional[float] = ..., message: _Optional[str] = ..., learning_rate: _Optional[float] = ..., data_wait_fraction: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "request_id", "kind", "state", "progress", "outputs", "error", "error_code", "create_time", "update_time", "attempt", "encode", "train", "render")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    kind: str
    state: JobState
    progress: Progress
    outputs: _containers.ScalarMap[str, str]
    error: str
    error_code: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    attempt: int
    encode: EncodeOutputs
    train: TrainOutputs
    render: RenderOutputs
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., outputs: _Optional[_Mapping[str, str]] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., encode: _Optional[_Union[EncodeOutputs, _Mapping]] = ..., train: _Optional[_Union[TrainOutputs, _Mapping]] = ..., render: _Optional[_Union[RenderOutputs, _Mapping]] = ...) -> None: ...

class EncodeOutputs(_message.Message):
    __slots__ = ("encoded", "cached", "failed", "index_keys")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    INDEX_KEYS_FIELD_NUMBER: _ClassVar[int]
    encoded: int
    cached: int
    failed: int
    index_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, encoded: _Optional[int] = ..., cached: _Optional[int] = ..., failed: _Optional[int] = ..., index_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainOutputs(_message.Message):
    __slots__ = ("run_id", "steps", "final_loss", "lora_keys", "checkpoint_steps", "validations", "missed_validations")
    class Validation(_message.Message):
        __slots__ = ("step", "job_id")
        STEP_FIELD_NUMBER: _ClassVar[int]
        JOB_ID_FIELD_NUMBER: _ClassVar[int]
        step: int
        job_id: str
        def __init__(self, step: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...
    class MissedValidation(_message.Message):
        __slots__ = ("step", "reason")
        STEP_FIELD_NUMBER: _ClassVar[int]
        REASON_FIELD_NUMBER: _ClassVar[int]
        step: int
        reason: str
        def __init__(self, step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LORA_KEYS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    MISSED_VALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    steps: int
    final_loss: float
    lora_keys: _containers.RepeatedScalarFieldContainer[str]
    checkpoint_steps: _containers.RepeatedScalarFieldContainer[int]
    validations: _containers.RepeatedCompositeFieldContainer[TrainOutputs.Validation]
    missed_validations: _containers.RepeatedCompositeFieldContainer[TrainOutputs.MissedValidation]
    def __init__(self, run_id: _Optional[str] = ..., steps: _Optional[int] = ..., final_loss: _Optional[float] = ..., lora_keys: _Optional[_Iterable[str]] = ..., checkpoint_steps: _Optional[_Iterable[int]] = ..., validations: _Optional[_Iterable[_Union[TrainOutputs.Validation, _Mapping]]] = ..., missed_validations: _Optional[_Iterable[_Union[TrainOutputs.MissedValidation, _Mapping]]] = ...) -> None: ...

class RenderOutputs(_message.Message):
    __slots__ = ("run_id", "step", "psnr_lora", "psnr_base", "metrics_key", "grid_keys", "report_key", "tensorboard_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PSNR_LORA_FIELD_NUMBER: _ClassVar[int]
    PSNR_BASE_FIELD_NUMBER: _ClassVar[int]
    METRICS_KEY_FIELD_NUMBER: _ClassVar[int]
    GRID_KEYS_FIELD_NUMBER: _ClassVar[int]
    REPORT_KEY_FIELD_NUMBER: _ClassVar[int]
    TENSORBOARD_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    psnr_lora: float
    psnr_base: float
    metrics_key: str
    grid_keys: _containers.RepeatedScalarFieldContainer[str]
    report_key: str
    tensorboard_key: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., psnr_lora: _Optional[float] = ..., psnr_base: _Optional[float] = ..., metrics_key: _Optional[str] = ..., grid_keys: _Optional[_Iterable[str]] = ..., report_key: _Optional[str] = ..., tensorboard_key: _Optional[str] = ...) -> None: ...

class RunConfigFiles(_message.Message):
    __slots__ = ("config_json", "data_json", "overrides", "config_name", "data_name")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_NAME_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    data_json: str
    overrides: _containers.RepeatedScalarFieldContainer[str]
    config_name: str
    data_name: str
    def __init__(self, config_json: _Optional[str] = ..., data_json: _Optional[str] = ..., overrides: _Optional[_Iterable[str]] = ..., config_name: _Optional[str] = ..., data_name: _Optional[str] = ...) -> None: ...
