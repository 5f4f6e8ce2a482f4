from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_PCC: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]
    METRIC_EUCLIDEAN: _ClassVar[Metric]

class ShapeMismatchPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHAPE_MISMATCH_POLICY_UNSPECIFIED: _ClassVar[ShapeMismatchPolicy]
    SHAPE_MISMATCH_POLICY_SKIP: _ClassVar[ShapeMismatchPolicy]
    SHAPE_MISMATCH_POLICY_LEADING_SLICE: _ClassVar[ShapeMismatchPolicy]
    SHAPE_MISMATCH_POLICY_ERROR: _ClassVar[ShapeMismatchPolicy]

class KinshipMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KINSHIP_MODE_UNSPECIFIED: _ClassVar[KinshipMode]
    KINSHIP_MODE_EXACT: _ClassVar[KinshipMode]
    KINSHIP_MODE_FINGERPRINT: _ClassVar[KinshipMode]
    KINSHIP_MODE_AUTO: _ClassVar[KinshipMode]
METRIC_UNSPECIFIED: Metric
METRIC_PCC: Metric
METRIC_COSINE: Metric
METRIC_EUCLIDEAN: Metric
SHAPE_MISMATCH_POLICY_UNSPECIFIED: ShapeMismatchPolicy
SHAPE_MISMATCH_POLICY_SKIP: ShapeMismatchPolicy
SHAPE_MISMATCH_POLICY_LEADING_SLICE: ShapeMismatchPolicy
SHAPE_MISMATCH_POLICY_ERROR: ShapeMismatchPolicy
KINSHIP_MODE_UNSPECIFIED: KinshipMode
KINSHIP_MODE_EXACT: KinshipMode
KINSHIP_MODE_FINGERPRINT: KinshipMode
KINSHIP_MODE_AUTO: KinshipMode

class CheckpointRef(_message.Message):
    __slots__ = ("path", "hub")
    PATH_FIELD_NUMBER: _ClassVar[int]
    HUB_FIELD_NUMBER: _ClassVar[int]
    path: str
    hub: HubCheckpoint
    def __init__(self, path: _Optional[str] = ..., hub: _Optional[_Union[HubCheckpoint, _Mapping]] = ...) -> None: ...

class HubCheckpoint(_message.Message):
    __slots__ = ("repo_id", "revision")
    REPO_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    repo_id: str
    revision: str
    def __init__(self, repo_id: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class KinshipValues(_message.Message):
    __slots__ = ("pcc", "cosine", "euclidean")
    PCC_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    EUCLIDEAN_FIELD_NUMBER: _ClassVar[int]
    pcc: float
    cosine: float
    euclidean: float
    def __init__(self, pcc: _Optional[float] = ..., cosine: _Optional[float] = ..., euclidean: _Optional[float] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
