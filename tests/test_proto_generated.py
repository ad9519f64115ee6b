"""The committed gRPC code (proto/federation_pb2*.py*) is what `make proto` makes from proto/federation.proto.

The comparison is byte for byte: the generated code embeds the protobuf and grpcio versions it was made with
(and checks them against the runtime at import), so the generator is pinned (requirements-dev.txt) and a
regeneration with the pinned grpcio-tools is reproducible. Comparing only the serialized descriptor would
miss a hand edit of the stubs and a generator version the pinned runtime does not accept.
"""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import proto

ROOT = Path(__file__).resolve().parents[1]


def _pin(requirements: str, name: str) -> Requirement:
    for line in (ROOT / requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-") and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} is not listed in {requirements}")


def _protoc(source_root: Path, out: Path) -> None:
    """What proto.generate() runs, on the federation.proto below ``source_root``."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    assert protoc.main(["grpc_tools.protoc", f"-I{source_root}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", "proto/federation.proto"]) == 0


def test_the_installed_generator_is_the_pinned_one():
    pinned = _pin("requirements-dev.txt", "grpcio-tools")
    assert str(pinned.specifier).startswith("=="), f"{pinned}: pin grpcio-tools exactly (its output embeds it)"
    assert version("grpcio-tools") in pinned.specifier, (
        f"grpcio-tools {version('grpcio-tools')} is installed, requirements-dev.txt pins {pinned}: "
        f"run make setup (pip install -r requirements-dev.txt)")


def test_the_committed_code_is_what_make_proto_generates(tmp_path):
    written = proto.generate(tmp_path)
    assert [path.name for path in written] == list(proto.GENERATED)
    stale = [path.name for path in written
             if path.read_bytes() != (ROOT / "proto" / path.name).read_bytes()]
    assert not stale, f"{stale} differ from what proto/federation.proto generates: run make proto and commit them"


def test_an_edit_of_the_proto_without_make_proto_is_caught(tmp_path):
    source = tmp_path / "src" / "proto" / "federation.proto"
    source.parent.mkdir(parents=True)
    source.write_text((ROOT / "proto" / "federation.proto").read_text()
                      + "\nmessage AddedField { string note = 1; }\n")
    _protoc(tmp_path / "src", tmp_path / "out")
    for name in proto.GENERATED:
        if name != "federation_pb2_grpc.py":   # the stubs only change with the services
            assert (tmp_path / "out" / "proto" / name).read_bytes() != (ROOT / "proto" / name).read_bytes(), name


def test_the_requirements_admit_the_runtimes_the_generated_code_demands():
    messages = (ROOT / "proto" / "federation_pb2.py").read_text()
    stubs = (ROOT / "proto" / "federation_pb2_grpc.py").read_text()
    protobuf_made = Version(re.search(r"^# Protobuf Python Version: (\S+)$", messages, re.MULTILINE).group(1))
    grpc_made = Version(re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", stubs, re.MULTILINE).group(1))
    for name, made in (("protobuf", protobuf_made), ("grpcio", grpc_made)):
        requirement = _pin("requirements.txt", name)
        floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        assert floors and min(floors) >= made, f"requirements.txt {requirement}: the generated code needs >= {made}"
    # protobuf accepts generated code only from its own major version.
    assert Version(f"{protobuf_made.major + 1}.0") not in _pin("requirements.txt", "protobuf").specifier
    assert Version(version("protobuf")).major == protobuf_made.major


@pytest.mark.parametrize("module", ["proto.federation_pb2_grpc", "server.servicer", "client.connection"])
def test_importing_never_runs_protoc(module):
    # grpc_tools made unimportable: importing the wire code must not need it (nor write anything).
    before = {path.name: path.stat().st_mtime_ns for path in (ROOT / "proto").iterdir() if path.is_file()}
    result = subprocess.run([sys.executable, "-B", "-c", f"import sys; sys.modules['grpc_tools'] = None; import {module}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {path.name: path.stat().st_mtime_ns for path in (ROOT / "proto").iterdir() if path.is_file()}
    assert after == before
