"""The committed gRPC code is what grpcio-tools generates from the vendored .proto."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("batching_server/grpc/proto/grpc_predict_v2.proto")
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
# The generator of the committed files (setup.cfg's dev extras pin it): another version
# writes other version checks into them.
GRPCIO_TOOLS = "1.81.1"


def test_regenerating_from_the_proto_gives_the_committed_files(tmp_path: Path) -> None:
    assert metadata.version("grpcio-tools") == GRPCIO_TOOLS, "pip install -e '.[dev]'"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(PROTO),
        ],
        cwd=ROOT,
        check=True,
    )  # fmt: skip
    for name in GENERATED:
        generated = (tmp_path / PROTO.parent / name).read_text(encoding="utf-8")
        committed = (ROOT / PROTO.parent / name).read_text(encoding="utf-8")
        assert generated == committed, (
            f"{name} differs from what grpcio-tools {GRPCIO_TOOLS} generates: run "
            f"python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "
            f"{PROTO}"
        )
