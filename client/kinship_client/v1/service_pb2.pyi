from . import kinship_pb2 as _kinship_pb2
from . import merge_pb2 as _merge_pb2
from . import recommend_pb2 as _recommend_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
