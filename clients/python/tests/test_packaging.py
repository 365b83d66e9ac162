"""The package is marked typed (PEP 561): it ships ``py.typed``, so type
checkers read its annotations, and ``broker_pb2.pyi``, the generated
messages' types (``broker_pb2.py`` builds its classes at import time).

ci.sh installs the package (not editable) and runs pytest with ``-P``, so
the first test checks what the installed package holds; the second checks
what a build of this source tree puts in it, whatever the install here.
"""
import importlib.resources
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_installed_package_is_marked_typed():
    package = importlib.resources.files("quota_broker_client")
    assert package.joinpath("py.typed").is_file(), (
        "quota_broker_client has no py.typed: type checkers ignore its annotations"
    )
    stubs = importlib.resources.files("quota_broker_client.quota.v1")
    assert stubs.joinpath("broker_pb2.pyi").is_file()


def test_a_build_ships_py_typed_and_the_message_types(tmp_path):
    pytest.importorskip("setuptools", reason="setuptools builds the package")
    lib = tmp_path / "lib"
    # build_py is the step that chooses the files a wheel holds; egg_info
    # writes its metadata under tmp_path, not in the source tree.
    done = subprocess.run(
        [
            sys.executable, "-c", "import setuptools; setuptools.setup()",
            "-q", "egg_info", "--egg-base", str(tmp_path),
            "build_py", "--build-lib", str(lib),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    package = lib / "quota_broker_client"
    assert (package / "client.py").is_file(), sorted(p.name for p in package.iterdir())
    assert (package / "py.typed").is_file(), "pyproject.toml's package-data lacks py.typed"
    assert (package / "quota" / "v1" / "broker_pb2.pyi").is_file(), (
        "pyproject.toml's package-data lacks the .pyi stubs"
    )
