"""Generate the Python stubs of `proto/kinship/v1` into `client/kinship_client/v1`.

Run `python scripts/gen_proto.py` after editing a `.proto` file and commit the
result; `tests/test_stubs.py` fails when the committed stubs are stale.

protoc writes absolute imports (`from kinship.v1 import common_pb2`) that
only work with `proto/` on `sys.path`; we rewrite them to relative imports so
the stubs live inside the `kinship_client` package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = PROTO_ROOT / "kinship" / "v1"
OUT_DIR = ROOT / "client" / "kinship_client" / "v1"

_ABSOLUTE_IMPORT = re.compile(r"^from kinship\.v1 import (\w+)", re.MULTILINE)


def generate() -> dict[str, str]:
    """Run protoc (from grpcio-tools) and return {file name: content}."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        out: dict[str, str] = {}
        for path in sorted((Path(tmp) / "kinship" / "v1").iterdir()):
            text = path.read_text()
            out[path.name] = _ABSOLUTE_IMPORT.sub(r"from . import \1", text)
    out["__init__.py"] = '"""Generated protobuf and gRPC stubs of kinship.v1 (see scripts/gen_proto.py)."""\n'
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed stubs are stale")
    args = parser.parse_args()
    files = generate()
    if args.check:
        stale = [n for n, t in files.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != t]
        extra = [p.name for p in OUT_DIR.glob("*.py*") if p.name not in files]
        if stale or extra:
            print(f"stale stubs: {stale + extra}; run python scripts/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for stale in OUT_DIR.glob("*.py*"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
