import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]

class MergeJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_JOB_STATE_UNSPECIFIED: _ClassVar[MergeJobState]
    MERGE_JOB_STATE_QUEUED: _ClassVar[MergeJobState]
    MERGE_JOB_STATE_RUNNING: _ClassVar[MergeJobState]
    MERGE_JOB_STATE_SUCCEEDED: _ClassVar[MergeJobState]
    MERGE_JOB_STATE_FAILED: _ClassVar[MergeJobState]
    MERGE_JOB_STATE_CANCELLED: _ClassVar[MergeJobState]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
MERGE_JOB_STATE_UNSPECIFIED: MergeJobState
MERGE_JOB_STATE_QUEUED: MergeJobState
MERGE_JOB_STATE_RUNNING: MergeJobState
MERGE_JOB_STATE_SUCCEEDED: MergeJobState
MERGE_JOB_STATE_FAILED: MergeJobState
MERGE_JOB_STATE_CANCELLED: MergeJobState

class LayerGradient(_message.Message):
    __slots__ = ("anchors",)
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    anchors: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, anchors: _Optional[_Iterable[float]] = ...) -> None: ...

class FactorValue(_message.Message):
    __slots__ = ("constant", "gradient")
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    constant: float
    gradient: LayerGradient
    def __init__(self, constant: _Optional[float] = ..., gradient: _Optional[_Union[LayerGradient, _Mapping]] = ...) -> None: ...

class FilteredFactor(_message.Message):
    __slots__ = ("filter", "value")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    filter: str
    value: FactorValue
    def __init__(self, filter: _Optional[str] = ..., value: _Optional[_Union[FactorValue, _Mapping]] = ...) -> None: ...

class InterpolationFactor(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FilteredFactor]
    def __init__(self, entries: _Optional[_Iterable[_Union[FilteredFactor, _Mapping]]] = ...) -> None: ...

class MergeModel(_message.Message):
    __slots__ = ("checkpoint", "weight", "density")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _common_pb2.CheckpointRef
    weight: InterpolationFactor
    density: InterpolationFactor
    def __init__(self, checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., weight: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., density: _Optional[_Union[InterpolationFactor, _Mapping]] = ...) -> None: ...

class SlerpParameters(_message.Message):
    __slots__ = ("t",)
    T_FIELD_NUMBER: _ClassVar[int]
    t: InterpolationFactor
    def __init__(self, t: _Optional[_Union[InterpolationFactor, _Mapping]] = ...) -> None: ...

class LinearParameters(_message.Message):
    __slots__ = ("weight", "normalize")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    weight: InterpolationFactor
    normalize: bool
    def __init__(self, weight: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class TaskArithmeticParameters(_message.Message):
    __slots__ = ("weight", "lambda_factor", "normalize")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    weight: InterpolationFactor
    lambda_factor: InterpolationFactor
    normalize: bool
    def __init__(self, weight: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., lambda_factor: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class TiesParameters(_message.Message):
    __slots__ = ("weight", "density", "lambda_factor", "normalize")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    weight: InterpolationFactor
    density: InterpolationFactor
    lambda_factor: InterpolationFactor
    normalize: bool
    def __init__(self, weight: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., density: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., lambda_factor: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class DareParameters(_message.Message):
    __slots__ = ("weight", "density", "lambda_factor", "normalize", "rescale", "seed")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    RESCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    weight: InterpolationFactor
    density: InterpolationFactor
    lambda_factor: InterpolationFactor
    normalize: bool
    rescale: bool
    seed: int
    def __init__(self, weight: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., density: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., lambda_factor: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., normalize: _Optional[bool] = ..., rescale: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class ModelStockParameters(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartMergeRequest(_message.Message):
    __slots__ = ("request_id", "model_a", "model_b", "t", "mergekit_yaml", "output_path", "dtype", "max_shard_bytes", "shape_mismatch_policy", "overwrite", "base", "slerp", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock", "models")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    MERGEKIT_YAML_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_MISMATCH_POLICY_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    SLERP_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    TASK_ARITHMETIC_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    DARE_TIES_FIELD_NUMBER: _ClassVar[int]
    DARE_LINEAR_FIELD_NUMBER: _ClassVar[int]
    MODEL_STOCK_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_a: _common_pb2.CheckpointRef
    model_b: _common_pb2.CheckpointRef
    t: InterpolationFactor
    mergekit_yaml: str
    output_path: str
    dtype: Dtype
    max_shard_bytes: int
    shape_mismatch_policy: _common_pb2.ShapeMismatchPolicy
    overwrite: bool
    base: _common_pb2.CheckpointRef
    slerp: SlerpParameters
    linear: LinearParameters
    task_arithmetic: TaskArithmeticParameters
    ties: TiesParameters
    dare_ties: DareParameters
    dare_linear: DareParameters
    model_stock: ModelStockParameters
    models: _containers.RepeatedCompositeFieldContainer[MergeModel]
    def __init__(self, request_id: _Optional[str] = ..., model_a: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., model_b: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., t: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., mergekit_yaml: _Optional[str] = ..., output_path: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., max_shard_bytes: _Optional[int] = ..., shape_mismatch_policy: _Optional[_Union[_common_pb2.ShapeMismatchPolicy, str]] = ..., overwrite: _Optional[bool] = ..., base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., slerp: _Optional[_Union[SlerpParameters, _Mapping]] = ..., linear: _Optional[_Union[LinearParameters, _Mapping]] = ..., task_arithmetic: _Optional[_Union[TaskArithmeticParameters, _Mapping]] = ..., ties: _Optional[_Union[TiesParameters, _Mapping]] = ..., dare_ties: _Optional[_Union[DareParameters, _Mapping]] = ..., dare_linear: _Optional[_Union[DareParameters, _Mapping]] = ..., model_stock: _Optional[_Union[ModelStockParameters, _Mapping]] = ..., models: _Optional[_Iterable[_Union[MergeModel, _Mapping]]] = ...) -> None: ...

class MergeProgress(_message.Message):
    __slots__ = ("tensors_done", "tensors_total", "bytes_done", "bytes_total", "eta_seconds")
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    eta_seconds: float
    def __init__(self, tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class MergeJob(_message.Message):
    __slots__ = ("job_id", "request_id", "state", "progress", "error", "output_path", "model_a", "model_b", "t", "create_time", "start_time", "end_time", "method", "models", "base")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    state: MergeJobState
    progress: MergeProgress
    error: _common_pb2.ErrorStatus
    output_path: str
    model_a: _common_pb2.CheckpointRef
    model_b: _common_pb2.CheckpointRef
    t: InterpolationFactor
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    method: str
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.CheckpointRef]
    base: _common_pb2.CheckpointRef
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., state: _Optional[_Union[MergeJobState, str]] = ..., progress: _Optional[_Union[MergeProgress, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorStatus, _Mapping]] = ..., output_path: _Optional[str] = ..., model_a: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., model_b: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., t: _Optional[_Union[InterpolationFactor, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., method: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_common_pb2.CheckpointRef, _Mapping]]] = ..., base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ...) -> None: ...

class StartMergeResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class GetMergeJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class ListMergeJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: MergeJobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[MergeJobState, str]] = ...) -> None: ...

class ListMergeJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[MergeJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[MergeJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelMergeJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...

class WatchMergeJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchMergeJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: MergeJob
    def __init__(self, job: _Optional[_Union[MergeJob, _Mapping]] = ...) -> None: ...
