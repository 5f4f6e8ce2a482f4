from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SKIP_REASON_UNSPECIFIED: _ClassVar[SkipReason]
    SKIP_REASON_MISSING: _ClassVar[SkipReason]
    SKIP_REASON_SHAPE_MISMATCH: _ClassVar[SkipReason]
    SKIP_REASON_NOT_FLOATING: _ClassVar[SkipReason]
SKIP_REASON_UNSPECIFIED: SkipReason
SKIP_REASON_MISSING: SkipReason
SKIP_REASON_SHAPE_MISMATCH: SkipReason
SKIP_REASON_NOT_FLOATING: SkipReason

class KinshipRequest(_message.Message):
    __slots__ = ("base", "models", "mode", "shape_mismatch_policy", "per_layer", "sign_conflict")
    BASE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_MISMATCH_POLICY_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SIGN_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    base: _common_pb2.CheckpointRef
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.CheckpointRef]
    mode: _common_pb2.KinshipMode
    shape_mismatch_policy: _common_pb2.ShapeMismatchPolicy
    per_layer: bool
    sign_conflict: bool
    def __init__(self, base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.CheckpointRef, _Mapping]]] = ..., mode: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., shape_mismatch_policy: _Optional[_Union[_common_pb2.ShapeMismatchPolicy, str]] = ..., per_layer: _Optional[bool] = ..., sign_conflict: _Optional[bool] = ...) -> None: ...

class SkippedTensor(_message.Message):
    __slots__ = ("name", "reason", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: SkipReason
    detail: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[_Union[SkipReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class PairKinship(_message.Message):
    __slots__ = ("first", "second", "values", "sign_conflict")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SIGN_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    first: int
    second: int
    values: _common_pb2.KinshipValues
    sign_conflict: float
    def __init__(self, first: _Optional[int] = ..., second: _Optional[int] = ..., values: _Optional[_Union[_common_pb2.KinshipValues, _Mapping]] = ..., sign_conflict: _Optional[float] = ...) -> None: ...

class LayerKinship(_message.Message):
    __slots__ = ("group", "tensors", "elements", "pairs", "mean")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    group: str
    tensors: int
    elements: int
    pairs: _containers.RepeatedCompositeFieldContainer[PairKinship]
    mean: _common_pb2.KinshipValues
    def __init__(self, group: _Optional[str] = ..., tensors: _Optional[int] = ..., elements: _Optional[int] = ..., pairs: _Optional[_Iterable[_Union[PairKinship, _Mapping]]] = ..., mean: _Optional[_Union[_common_pb2.KinshipValues, _Mapping]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("index", "identity", "delta_norm", "delta_mean")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DELTA_NORM_FIELD_NUMBER: _ClassVar[int]
    DELTA_MEAN_FIELD_NUMBER: _ClassVar[int]
    index: int
    identity: str
    delta_norm: float
    delta_mean: float
    def __init__(self, index: _Optional[int] = ..., identity: _Optional[str] = ..., delta_norm: _Optional[float] = ..., delta_mean: _Optional[float] = ...) -> None: ...

class KinshipResponse(_message.Message):
    __slots__ = ("pairs", "mean", "mode_used", "tensors_compared", "elements_compared", "sliced_tensors", "skipped", "layers", "models", "bytes_read", "device", "seconds", "mean_sign_conflict")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_COMPARED_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_COMPARED_FIELD_NUMBER: _ClassVar[int]
    SLICED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SIGN_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[PairKinship]
    mean: _common_pb2.KinshipValues
    mode_used: _common_pb2.KinshipMode
    tensors_compared: int
    elements_compared: int
    sliced_tensors: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedTensor]
    layers: _containers.RepeatedCompositeFieldContainer[LayerKinship]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    bytes_read: int
    device: str
    seconds: float
    mean_sign_conflict: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[PairKinship, _Mapping]]] = ..., mean: _Optional[_Union[_common_pb2.KinshipValues, _Mapping]] = ..., mode_used: _Optional[_Union[_common_pb2.KinshipMode, str]] = ..., tensors_compared: _Optional[int] = ..., elements_compared: _Optional[int] = ..., sliced_tensors: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[_Union[SkippedTensor, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerKinship, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ..., bytes_read: _Optional[int] = ..., device: _Optional[str] = ..., seconds: _Optional[float] = ..., mean_sign_conflict: _Optional[float] = ...) -> None: ...

class RegisterCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint", "base")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _common_pb2.CheckpointRef
    base: _common_pb2.CheckpointRef
    def __init__(self, checkpoint: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ..., base: _Optional[_Union[_common_pb2.CheckpointRef, _Mapping]] = ...) -> None: ...

class LayerNorm(_message.Message):
    __slots__ = ("group", "norm")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    group: str
    norm: float
    def __init__(self, group: _Optional[str] = ..., norm: _Optional[float] = ...) -> None: ...

class RegisterCheckpointResponse(_message.Message):
    __slots__ = ("identity", "base_identity", "already_registered", "tensors", "elements", "size_bytes", "delta_sum", "delta_sum_squares", "layer_norms", "fingerprint_bytes", "delta_bytes", "seconds")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    BASE_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_SUM_FIELD_NUMBER: _ClassVar[int]
    DELTA_SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    LAYER_NORMS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    identity: str
    base_identity: str
    already_registered: bool
    tensors: int
    elements: int
    size_bytes: int
    delta_sum: float
    delta_sum_squares: float
    layer_norms: _containers.RepeatedCompositeFieldContainer[LayerNorm]
    fingerprint_bytes: int
    delta_bytes: int
    seconds: float
    def __init__(self, identity: _Optional[str] = ..., base_identity: _Optional[str] = ..., already_registered: _Optional[bool] = ..., tensors: _Optional[int] = ..., elements: _Optional[int] = ..., size_bytes: _Optional[int] = ..., delta_sum: _Optional[float] = ..., delta_sum_squares: _Optional[float] = ..., layer_norms: _Optional[_Iterable[_Union[LayerNorm, _Mapping]]] = ..., fingerprint_bytes: _Optional[int] = ..., delta_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
