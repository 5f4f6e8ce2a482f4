"""Generated protobuf and gRPC stubs of kinship.v1 (see scripts/gen_proto.py)."""
