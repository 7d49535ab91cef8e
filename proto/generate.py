"""Regenerate the data-plane stubs in peer/rpc/ from proto/swarm/v1/stage.proto.

    python proto/generate.py          # rewrite peer/rpc/stage_pb2.py, stage_pb2.pyi, stage_pb2_grpc.py
    python proto/generate.py --check  # exit 1 if the checked-in stubs differ from what the .proto gives

The generator versions are pinned (protoc comes with grpcio-tools; the .pyi with
mypy-protobuf) so that the output is byte-for-byte reproducible. The .proto is compiled
as ``peer/rpc/stage.proto`` so that the generated modules import each other as
``peer.rpc.stage_pb2`` (nothing imports a top-level ``proto`` package).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

PINNED = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proto" / "swarm" / "v1" / "stage.proto"
PACKAGE_PATH = Path("peer") / "rpc"
OUTPUTS = ("stage_pb2.py", "stage_pb2.pyi", "stage_pb2_grpc.py")


def check_versions() -> None:
    for dist, wanted in PINNED.items():
        found = importlib.metadata.version(dist)
        if found != wanted:
            sys.exit(f"proto/generate.py: {dist}=={wanted} is pinned, found {found} (pip install -c constraints.txt)")


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / PACKAGE_PATH / "stage.proto"
        staged.parent.mkdir(parents=True)
        shutil.copyfile(SOURCE, staged)
        (out_dir / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
        mypy_plugin = Path(sys.executable).parent / "protoc-gen-mypy"
        args = [
            "protoc",
            f"-I{staging}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--plugin=protoc-gen-mypy={mypy_plugin}",
            f"--mypy_out={out_dir}",
            str(PACKAGE_PATH / "stage.proto"),
        ]
        if protoc.main(args) != 0:
            sys.exit("proto/generate.py: protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = parser.parse_args()
    check_versions()
    if not args.check:
        generate(ROOT)
        print("regenerated", ", ".join(str(PACKAGE_PATH / name) for name in OUTPUTS))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in OUTPUTS
                 if not (ROOT / PACKAGE_PATH / name).exists()
                 or not filecmp.cmp(Path(tmp) / PACKAGE_PATH / name, ROOT / PACKAGE_PATH / name, shallow=False)]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run: python proto/generate.py", file=sys.stderr)
        return 1
    print("stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
