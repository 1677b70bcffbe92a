"""Pull benchmark: ImageService pull+unpack against skopeo (download only) and containerd.

Run as ``.venv/bin/python benchmarks/pull_bench.py [--rootfs DIR] [--runs N]``. It builds a
multi-layer image from a Debian root filesystem (``--rootfs``, else ``debootstrap --variant=
minbase`` into a temporary directory when debootstrap is installed, else synthesized files),
pushes it to a docker-registry on 127.0.0.1, and times:

* ``skopeo copy docker://... oci:DIR``: download of every blob, as the reference;
* ``ImageService.pull`` into a fresh root: download, verify and unpack every layer;
* ``ctr image pull`` against a private containerd with the overlayfs snapshotter (when the
  ``containerd`` package is installed): download, verify and unpack, the fair comparison;
* a second pull of an image that shares all layers (only the config differs).

It also prints the cost of creating one empty file in the work directory, because on some ext4
disks that cost depends on the directory's inode group and dominates an unpack.

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
from subprocess import Popen
from typing import Self

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


CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""


class Containerd:
    """A private containerd under ``work`` that the benchmark starts and stops by PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.socket = work / "containerd.sock"
        self.process: Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.work.mkdir(parents=True)
        config = self.work / "config.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(
                root=self.work / "root", state=self.work / "state", socket=self.socket
            )
        )
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config), "--log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "containerd.log", "wb"),
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.work / 'containerd.log'}")
            time.sleep(0.05)
        return self

    def ctr(self, *args: str) -> None:
        subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "bench", *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def pull_once(self, ref: str) -> float:
        """Pull and unpack ``ref``, then remove it and its snapshots again."""
        started = time.perf_counter()
        self.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
        seconds = time.perf_counter() - started
        self.ctr("image", "rm", "--sync", ref)
        return seconds

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Unmount anything containerd left mounted under its root before deleting it.
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1]
            if target.startswith(str(self.work)):
                subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def create_cost_us(directory: Path, count: int = 500) -> float:
    """Return the mean wall time in microseconds to create one empty file in a new subdirectory."""
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    try:
        started = time.perf_counter()
        for index in range(count):
            os.close(os.open(probe / f"f{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return (time.perf_counter() - started) / count * 1e6
    finally:
        shutil.rmtree(probe)


def report(name: str, seconds: float, compressed: int, skopeo: float) -> None:
    print(
        f"{name:<34} {seconds:6.2f} s {compressed / 1e6 / seconds:7.1f} MB/s "
        f"{seconds / skopeo:6.2f}x skopeo"
    )


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
    parser.add_argument(
        "--no-containerd", action="store_true", help="skip the containerd measurement"
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

        use_containerd = shutil.which("containerd") is not None and not args.no_containerd
        with Registry() as registry:
            with Pusher(registry.host) as pusher:
                ref = pusher.push_image("bench/debian", "1", image)
                sibling_ref = pusher.push_image("bench/debian", "2", sibling)
            skopeo_times, pull_times, second_times, containerd_times = [], [], [], []
            for run in range(args.runs):
                skopeo_times.append(skopeo_once(ref, work / f"oci-{run}"))
                shutil.rmtree(work / f"oci-{run}")
                root = work / f"root-{run}"
                seconds, _ = asyncio.run(pull_once(ref, root))
                pull_times.append(seconds)
                second, _ = asyncio.run(pull_once(sibling_ref, root))
                second_times.append(second)
                shutil.rmtree(root)
            if use_containerd:
                with Containerd(work / "containerd") as containerd:
                    for _ in range(args.runs):
                        containerd_times.append(containerd.pull_once(ref))

        skopeo_best, pull_best = min(skopeo_times), min(pull_times)
        print(
            f"image: {len(layers)} layers, {uncompressed / 1e6:.1f} MB uncompressed, "
            f"{compressed / 1e6:.1f} MB gzip ({source})"
        )
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, work dir {work}")
        print(f"creating one empty file in the work dir: {create_cost_us(work):.0f} us")
        report("skopeo copy (download only)", skopeo_best, compressed, skopeo_best)
        report("servin-shim pull+unpack", pull_best, compressed, skopeo_best)
        if containerd_times:
            containerd_best = min(containerd_times)
            report("containerd pull+unpack (ctr)", containerd_best, compressed, skopeo_best)
            print(f"servin-shim / containerd:          {pull_best / containerd_best:6.2f}x")
        print(f"second pull, shared layers:  {min(second_times):.3f} s")
        print(
            f"all runs: skopeo={[round(t, 2) for t in skopeo_times]} "
            f"pull={[round(t, 2) for t in pull_times]} "
            f"containerd={[round(t, 2) for t in containerd_times]} "
            f"second={[round(t, 3) for t in second_times]}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
