"""Generated gRPC stubs for npc_voice.proto; they are built from the .proto on first import if missing or stale."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PROTO = Path(__file__).with_name("npc_voice.proto")


def generate(out_dir: Path | None = None) -> None:
    """Compile npc_voice.proto into npc_voice_pb2.py / npc_voice_pb2_grpc.py (needs grpcio-tools)."""
    from grpc_tools import protoc

    out = out_dir or PROTO.parent
    args = ["protoc", f"-I{PROTO.parent}", f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    # the generated grpc module imports `npc_voice_pb2` as a top-level module; make it package-relative
    grpc_file = out / "npc_voice_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import npc_voice_pb2 as", "from . import npc_voice_pb2 as"))


def _stale() -> bool:
    generated = [PROTO.with_name("npc_voice_pb2.py"), PROTO.with_name("npc_voice_pb2_grpc.py")]
    return any(not g.exists() or g.stat().st_mtime < PROTO.stat().st_mtime for g in generated)


if _stale():
    generate()

pb = importlib.import_module(f"{__name__}.npc_voice_pb2")
rpc = importlib.import_module(f"{__name__}.npc_voice_pb2_grpc")

if __name__ == "__main__":  # python -m npc_server.service.protos: regenerate
    generate()
    print(f"generated stubs next to {PROTO}", file=sys.stderr)
