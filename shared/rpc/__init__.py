"""Generated protobuf and gRPC code for the coffer.v1 wire contract (see proto/)."""
