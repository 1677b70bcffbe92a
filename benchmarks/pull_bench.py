"""Pull benchmark: ImageService pull+unpack against ``skopeo copy`` (download only).

Run as ``.venv/bin/python benchmarks/pull_bench.py [--rootfs DIR] [--runs N]``. It builds a
multi-layer image from a Debian root filesystem (``--rootfs``, else ``debootstrap --variant=
minbase`` into a temporary directory when debootstrap is installed, else synthesized files),
pushes it to a docker-registry on 127.0.0.1, and times:

* ``skopeo copy docker://... oci:DIR``: download of every blob, as the reference;
* ``ImageService.pull`` into a fresh root: download, verify and unpack every layer;
* a second pull of an image that shares all layers (only the config differs).

Each measurement is the best of ``--runs`` runs. ``--work-dir`` places the pulled roots (and
skopeo's output) elsewhere, such as on tmpfs. This is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from servin_shim.images.service import ImageService
from servin_shim.state.db import Database
from tests.support.imagebuild import Layer, Pusher, make_image, make_layer
from tests.support.registry import Registry

log = logging.getLogger("pull_bench")

DEBIAN_MIRROR = "http://deb.debian.org/debian"
MIN_IMAGE_BYTES = 100 * 1000 * 1000
# Top-level groups that become separate layers, bottom first; the rest goes in the last one.
LAYER_GROUPS = [
    ("usr/lib",),
    ("usr/share",),
    ("usr/bin", "usr/sbin", "usr/libexec"),
    ("var", "etc"),
]


def debootstrap_rootfs(target: Path) -> bool:
    """Debootstrap a minimal Debian 12 root into ``target``; return False when unavailable."""
    if shutil.which("debootstrap") is None:
        return False
    print(f"debootstrap bookworm minbase into {target} (a few minutes)", flush=True)
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(target), DEBIAN_MIRROR],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(f"debootstrap failed, synthesizing files instead:\n{result.stderr[-1000:]}")
        return False
    return True


def synthesize_rootfs(target: Path, total_bytes: int = 160 * 1000 * 1000) -> None:
    """Write a tree shaped like a distribution: many small text files and some large binaries."""
    rng = random.Random(42)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(500)]
    written = 0
    index = 0
    while written < total_bytes:
        group = LAYER_GROUPS[index % len(LAYER_GROUPS)][0]
        directory = target / group / f"pkg{index // 40}"
        directory.mkdir(parents=True, exist_ok=True)
        if index % 10 == 0:
            size = rng.randint(500_000, 3_000_000)
            # Half random, half repetitive: machine code compresses to roughly this ratio.
            data = rng.randbytes(size // 2) + bytes(size - size // 2)
            (directory / f"lib{index}.so").write_bytes(data)
        else:
            size = rng.randint(2_000, 40_000)
            data = b" ".join(rng.choice(words) for _ in range(size // 7))
            (directory / f"doc{index}.txt").write_bytes(data)
        written += size
        index += 1


def layer_tars(rootfs: Path) -> list[bytes]:
    """Split ``rootfs`` into uncompressed layer tars by LAYER_GROUPS, bottom first."""
    groups = [[rootfs / p for p in group if (rootfs / p).exists()] for group in LAYER_GROUPS]
    claimed = {p for group in groups for p in group}
    rest = [p for p in sorted(rootfs.iterdir()) if p not in claimed and p.name != "usr"]
    rest += [p for p in sorted((rootfs / "usr").iterdir()) if p not in claimed]
    tars = []
    for paths in [*groups, rest]:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for path in paths:
                archive.add(path, arcname=str(path.relative_to(rootfs)))
        tars.append(buffer.getvalue())
    return tars


async def pull_once(ref: str, root: Path) -> tuple[float, str]:
    db = Database(root / "servin.db")
    try:
        service = ImageService(root, db, parallel_pulls=3)
        started = time.perf_counter()
        image_id = await service.pull(ref)
        return time.perf_counter() - started, image_id
    finally:
        db.close()


def skopeo_once(ref: str, target: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{target}"],
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rootfs", type=Path, help="existing root filesystem to package")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (best counts)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="directory for image roots and skopeo output, e.g. /dev/shm to leave out the "
        "disk's file creation cost (default: the system temporary directory)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="servin-bench-", dir=args.work_dir))
    try:
        rootfs = args.rootfs
        source = "given root filesystem"
        if rootfs is None:
            rootfs = work / "rootfs"
            if debootstrap_rootfs(rootfs):
                source = "debootstrap bookworm minbase"
            else:
                shutil.rmtree(rootfs, ignore_errors=True)
                synthesize_rootfs(rootfs)
                source = "synthesized files"
        print(f"packaging {rootfs} ({source})", flush=True)
        tars = layer_tars(rootfs)
        layers: list[Layer] = [make_layer(tar, "gzip") for tar in tars]
        uncompressed = sum(len(tar) for tar in tars)
        compressed = sum(layer.blob.size for layer in layers)
        if uncompressed < MIN_IMAGE_BYTES:
            print(f"warning: image is {uncompressed / 1e6:.0f} MB, below 100 MB")
        image = make_image(layers, cmd=["/bin/sh"])
        sibling = make_image(layers, cmd=["/bin/true"])

        with Registry() as registry:
            with Pusher(registry.host) as pusher:
                ref = pusher.push_image("bench/debian", "1", image)
                sibling_ref = pusher.push_image("bench/debian", "2", sibling)
            skopeo_times, pull_times, second_times = [], [], []
            for run in range(args.runs):
                skopeo_times.append(skopeo_once(ref, work / f"oci-{run}"))
                shutil.rmtree(work / f"oci-{run}")
                root = work / f"root-{run}"
                seconds, _ = asyncio.run(pull_once(ref, root))
                pull_times.append(seconds)
                second, _ = asyncio.run(pull_once(sibling_ref, root))
                second_times.append(second)
                shutil.rmtree(root)

        skopeo_best, pull_best = min(skopeo_times), min(pull_times)
        print(
            f"image: {len(layers)} layers, {uncompressed / 1e6:.1f} MB uncompressed, "
            f"{compressed / 1e6:.1f} MB gzip ({source})"
        )
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, work dir {work}")
        print(
            f"skopeo copy (download only): {skopeo_best:.2f} s, "
            f"{compressed / 1e6 / skopeo_best:.1f} MB/s"
        )
        print(
            f"ImageService pull+unpack:    {pull_best:.2f} s, "
            f"{compressed / 1e6 / pull_best:.1f} MB/s"
        )
        print(f"ratio pull/skopeo:           {pull_best / skopeo_best:.2f}")
        print(f"second pull, shared layers:  {min(second_times):.3f} s")
        print(
            f"all runs: skopeo={[round(t, 2) for t in skopeo_times]} "
            f"pull={[round(t, 2) for t in pull_times]} "
            f"second={[round(t, 3) for t in second_times]}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
