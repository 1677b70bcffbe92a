"""Generate the betterproto2 Python modules in servin_shim/api from the CRI .proto files.

Run from anywhere as ``.venv/bin/python protos/generate.py``. The script owns the one command
that turns protos/runtime/{v1,v1alpha2}/api.proto into servin_shim/api/runtime/{v1,v1alpha2}.
tests/test_api_protos.py calls generate() into a temporary directory and compares the result with
the committed tree, so the committed modules cannot drift from the .proto files.

The output is deterministic for fixed tool versions: betterproto2-compiler writes no timestamps
and formats its output with ruff, which reads [tool.ruff] from the repository's pyproject.toml.
Different versions of betterproto2-compiler, grpcio-tools or ruff may change the output.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
OUTPUT_DIR = REPO_ROOT / "servin_shim" / "api"
PROTO_FILES = ("runtime/v1/api.proto", "runtime/v1alpha2/api.proto")

# Async grpclib client stubs (RuntimeServiceStub) and async server bases (RuntimeServiceBase).
PLUGIN_OPTIONS = "client_generation=async,server_generation=async"


def _find_plugin(bin_dir: Path) -> Path:
    """Return the protoc-gen-python_betterproto2 executable installed next to the interpreter."""
    plugin = bin_dir / "protoc-gen-python_betterproto2"
    if not plugin.is_file():
        raise FileNotFoundError(
            f"protoc plugin {plugin} not found; install the test extras with "
            "'.venv/bin/pip install -e .[test]' (betterproto2-compiler)"
        )
    return plugin


def protoc_command(
    out_dir: Path, proto_root: Path = PROTO_ROOT, proto_files: Sequence[str] = PROTO_FILES
) -> list[str]:
    """Build the grpc_tools.protoc command line that writes the Python modules into out_dir.

    proto_files are paths relative to proto_root, which is also the import path.
    """
    plugin = _find_plugin(Path(sys.executable).parent)
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--plugin=protoc-gen-python_betterproto2={plugin}",
        f"--python_betterproto2_out={out_dir}",
        f"--python_betterproto2_opt={PLUGIN_OPTIONS}",
        *proto_files,
    ]


def generate(
    out_dir: Path, proto_root: Path = PROTO_ROOT, proto_files: Sequence[str] = PROTO_FILES
) -> None:
    """Generate the modules into out_dir, which must exist and should be empty.

    The defaults produce the CRI modules; tests pass their own proto_root and proto_files.
    """
    env = dict(os.environ)
    # The plugin runs `ruff` by name, so the venv's bin directory has to be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = protoc_command(out_dir, proto_root, proto_files)
    log.debug("running protoc command=%s", command)
    # cwd is the repository root so that ruff picks up its settings from pyproject.toml.
    result = subprocess.run(
        command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"protoc failed with exit code {result.returncode}: {result.stderr.strip()}; "
            "check the .proto files under protos/ and the installed betterproto2-compiler"
        )


def regenerate_in_place() -> None:
    """Replace servin_shim/api with freshly generated modules."""
    with tempfile.TemporaryDirectory(prefix="servin-api-") as tmp:
        staging = Path(tmp) / "api"
        staging.mkdir()
        generate(staging)
        # Swap only after generation succeeded, so a failed run leaves the old modules in place.
        shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
        shutil.copytree(staging, OUTPUT_DIR)
    log.info("generated modules output_dir=%s", OUTPUT_DIR)


def main() -> None:
    """Parse the command line and regenerate servin_shim/api."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="log the protoc command")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    regenerate_in_place()


if __name__ == "__main__":
    main()
