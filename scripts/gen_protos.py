"""Generate the Python stubs and Envoy's descriptor set from proto/.

Generated code is never committed: `make` (and the Dockerfile) run this before anything
imports `aiproxy.ai.agent.v1`. It writes
  aiproxy/ai/agent/v1/*_pb2*.py  Python messages and gRPC stubs: the proto package, inside
                                 the one installed namespace (protoc writes `ai.agent.v1`
                                 imports; they are rewritten to `aiproxy.ai.agent.v1`)
  build/third_party/google/...   the googleapis protos we import, for buf and protoc
  build/descriptors/aiproxy.pb   a FileDescriptorSet for Envoy's gRPC-JSON transcoder; it
                                 includes google/rpc/error_details.proto, without which
                                 Envoy silently drops error bodies (DESIGN.md section 3).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
THIRD_PARTY = ROOT / "build" / "third_party"
DESCRIPTORS = ROOT / "build" / "descriptors"
# The stubs go inside the installed namespace, aiproxy/ (the package that holds the links
# to core/, server/, ...).
OUT = ROOT / "aiproxy"
# protoc names modules by the proto package (`ai.agent.v1`): imports between stubs.
_STUB_IMPORT = re.compile(r"^(from|import) ai([. ])", re.MULTILINE)

# googleapis protos our API imports (or Envoy needs to render errors).
GOOGLEAPIS = [
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
]


def _googleapis_root() -> pathlib.Path:
    import google.api.annotations_pb2 as annotations

    return pathlib.Path(annotations.__file__).resolve().parent.parent.parent


def copy_third_party() -> None:
    src_root = _googleapis_root()
    for rel in GOOGLEAPIS:
        src = src_root / rel
        if not src.exists():
            raise SystemExit(
                f"gen_protos: {rel} not found in googleapis-common-protos at {src_root}"
            )
        dst = THIRD_PARTY / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def run_protoc(args: list[str]) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    argv = ["protoc", f"-I{PROTO_DIR}", f"-I{THIRD_PARTY}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        raise SystemExit(f"gen_protos: protoc failed: {' '.join(argv)}")


def main() -> int:
    copy_third_party()
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    run_protoc([f"--python_out={OUT}", f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", *sources])
    for generated in (OUT / "ai").rglob("*_pb2*.py*"):
        text = generated.read_text()
        generated.write_text(_STUB_IMPORT.sub(r"\1 aiproxy.ai\2", text))
    # Regular packages (not namespace ones), so wheels and setuptools find them.
    for source in sources:
        package = (OUT / source).parent
        while package != OUT:
            (package / "__init__.py").touch()
            package = package.parent
    DESCRIPTORS.mkdir(parents=True, exist_ok=True)
    run_protoc(
        [
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={DESCRIPTORS / 'aiproxy.pb'}",
            *sources,
            "google/rpc/error_details.proto",
        ]
    )
    # The same set inside the generated package, so a wheel (the container image) ships
    # it and `aiproxy envoy` finds it without a checkout (server/edge/config.py).
    shutil.copyfile(DESCRIPTORS / "aiproxy.pb", OUT / "ai" / "aiproxy.pb")
    print(f"gen_protos: {len(sources)} proto file(s) -> aiproxy/ai/, build/descriptors/aiproxy.pb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
