"""The checked-in stubs are exactly what regen.sh makes from ../../proto.

Fails when broker.proto changed without `./regen.sh` (or the stubs were edited).
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _regen_module():
    spec = importlib.util.spec_from_file_location("regen", os.path.join(ROOT, "regen.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checked_in_stubs_match_proto(tmp_path):
    regen = _regen_module()
    assert os.path.exists(os.path.join(regen.PROTO_ROOT, regen.PROTO_FILE))
    regen.generate(str(tmp_path))
    for name in regen.STUBS:
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        with open(os.path.join(regen.PACKAGE_DIR, name), encoding="utf-8") as f:
            checked_in = f.read()
        assert fresh == checked_in, (
            f"quota_broker_client/quota/v1/{name} is out of date with "
            f"proto/{regen.PROTO_FILE}: run clients/python/regen.sh and commit the result"
        )


def test_installed_package_stubs_are_the_checked_in_ones():
    # The package under test (installed by ci.sh) ships the same stubs.
    import quota_broker_client.quota.v1 as v1

    regen = _regen_module()
    for name in regen.STUBS:
        with open(os.path.join(os.path.dirname(v1.__file__), name), encoding="utf-8") as a, \
                open(os.path.join(regen.PACKAGE_DIR, name), encoding="utf-8") as b:
            assert a.read() == b.read(), f"installed {name} differs from the source tree: reinstall"


def test_stubs_cover_every_rpc():
    from quota_broker_client.quota.v1 import broker_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name
    assert set(svc["QuotaBroker"].methods_by_name) == {"Acquire", "Release", "Renew", "Report", "Watch", "LeaseStream"}
    assert "ListBuckets" in svc["QuotaAdmin"].methods_by_name
