"""Build hook: compile protos/csi.proto into secretfs/csi/pb at build time.

The generated modules are build products and are not kept in the checkout;
`pip install .` always produces stubs that match protos/csi.proto.
"""

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = Path(__file__).parent / "protos" / "csi.proto"


def compile_protos(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    # protoc writes a top-level import; inside a package it must be relative.
    grpc_module = out_dir / "csi_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(
        re.sub(r"^import csi_pb2 as", "from . import csi_pb2 as", text, flags=re.M)
    )
    (out_dir / "__init__.py").write_text('"""Stubs generated from protos/csi.proto."""\n')


class BuildWithProtos(build_py):
    def run(self) -> None:
        super().run()
        compile_protos(Path(self.build_lib) / "secretfs" / "csi" / "pb")


setup(cmdclass={"build_py": BuildWithProtos})
