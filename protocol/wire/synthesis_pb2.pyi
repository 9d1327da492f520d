import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_VECTOR: _ClassVar[Method]
    METHOD_PE: _ClassVar[Method]

class TrustMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUST_MODE_UNSPECIFIED: _ClassVar[TrustMode]
    TRUST_MODE_DISTRIBUTED: _ClassVar[TrustMode]
    TRUST_MODE_CENTRAL: _ClassVar[TrustMode]
    TRUST_MODE_LOCAL: _ClassVar[TrustMode]
METHOD_UNSPECIFIED: Method
METHOD_VECTOR: Method
METHOD_PE: Method
TRUST_MODE_UNSPECIFIED: TrustMode
TRUST_MODE_DISTRIBUTED: TrustMode
TRUST_MODE_CENTRAL: TrustMode
TRUST_MODE_LOCAL: TrustMode

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseInfo(_message.Message):
    __slots__ = ("release_id", "created", "method", "epsilon", "delta", "trust_mode", "labels", "digest", "model_name", "model_fingerprint")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TRUST_MODE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    created: _timestamp_pb2.Timestamp
    method: Method
    epsilon: float
    delta: float
    trust_mode: TrustMode
    labels: _containers.RepeatedScalarFieldContainer[str]
    digest: str
    model_name: str
    model_fingerprint: str
    def __init__(self, release_id: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., method: _Optional[_Union[Method, str]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., trust_mode: _Optional[_Union[TrustMode, str]] = ..., labels: _Optional[_Iterable[str]] = ..., digest: _Optional[str] = ..., model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[ReleaseInfo]
    def __init__(self, releases: _Optional[_Iterable[_Union[ReleaseInfo, _Mapping]]] = ...) -> None: ...

class GetPrivacyReportRequest(_message.Message):
    __slots__ = ("release_id",)
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    def __init__(self, release_id: _Optional[str] = ...) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("release", "report_json", "steering_json")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    STEERING_JSON_FIELD_NUMBER: _ClassVar[int]
    release: ReleaseInfo
    report_json: str
    steering_json: str
    def __init__(self, release: _Optional[_Union[ReleaseInfo, _Mapping]] = ..., report_json: _Optional[str] = ..., steering_json: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("release_id", "n", "label", "seed", "strength", "shots", "select", "variants")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    n: int
    label: str
    seed: int
    strength: float
    shots: int
    select: float
    variants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, release_id: _Optional[str] = ..., n: _Optional[int] = ..., label: _Optional[str] = ..., seed: _Optional[int] = ..., strength: _Optional[float] = ..., shots: _Optional[int] = ..., select: _Optional[float] = ..., variants: _Optional[_Iterable[str]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("text", "label", "release_id", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    label: str
    release_id: str
    index: int
    def __init__(self, text: _Optional[str] = ..., label: _Optional[str] = ..., release_id: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...
