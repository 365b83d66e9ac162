"""Generated gRPC stubs for quota.v1 (regen.sh; do not edit broker_pb2*.py)."""
