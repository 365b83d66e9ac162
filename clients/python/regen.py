"""Regenerates the checked-in gRPC stubs (and the messages' type stub,
broker_pb2.pyi) from ../../proto (see regen.sh).

The stubs live in quota_broker_client/quota/v1/. grpcio-tools writes
``from quota.v1 import broker_pb2``, which only works with the proto root on
sys.path; the import is rewritten to a relative one so the stubs work inside
the package. tests/test_stubs.py calls generate() into a temp dir and compares
the result with the checked-in files.
"""
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO_FILE = "quota/v1/broker.proto"
PACKAGE_DIR = os.path.join(HERE, "quota_broker_client", "quota", "v1")
# broker_pb2.pyi: the messages' types, for type checkers (the package is
# marked typed, py.typed; broker_pb2.py builds its classes at import time).
STUBS = ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py")
# The generator the checked-in stubs come from (keep in sync with pyproject.toml).
GRPCIO_TOOLS_VERSION = "1.62.3"


def _installed_tools_version():
    from importlib.metadata import version

    return version("grpcio-tools")


def generate(out_dir):
    """Writes the fixed-up stubs (STUBS) into out_dir and returns their paths."""
    from grpc_tools import protoc

    found = _installed_tools_version()
    if found != GRPCIO_TOOLS_VERSION:
        raise RuntimeError(
            f"grpcio-tools {found} is installed; the stubs are generated with "
            f"grpcio-tools=={GRPCIO_TOOLS_VERSION} (pip install '.[test]')"
        )
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as raw:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                PROTO_FILE,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with status {rc} on {PROTO_FILE}")
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name in STUBS:
            with open(os.path.join(raw, "quota", "v1", name), encoding="utf-8") as f:
                text = f.read()
            text = text.replace(
                "from quota.v1 import broker_pb2 as", "from . import broker_pb2 as"
            )
            path = os.path.join(out_dir, name)
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            paths.append(path)
        return paths


if __name__ == "__main__":
    for p in generate(PACKAGE_DIR):
        print("wrote", os.path.relpath(p, HERE))
    sys.exit(0)
