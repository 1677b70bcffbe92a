"""Benchmark pod start through servin-shim against bare ``runc run -d``.

It times one RunPodSandbox + CreateContainer + StartContainer sequence (workload ``sleep 1000``),
then 50 such sequences at once, then StopPodSandbox and RemovePodSandbox of those 50 pods. As
a reference it times ``runc run -d`` of a hand-made busybox bundle, once and 50 times at once,
in the same run. The script prints numbers and asserts none of them.

Run as root from the repository root: ``.venv/bin/python benchmarks/pod_start.py``. With
``--profile FILE`` it also records the daemon with py-spy (``.venv/bin/pip install py-spy``)
during the 50 concurrent starts and writes collapsed stacks to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from servin_shim.api.runtime import v1 as cri
from tests.support.daemon import Daemon
from tests.support.imagebuild import BUSYBOX_BINARY, busybox_image, push_image
from tests.support.registry import Registry

log = logging.getLogger(__name__)

CONCURRENT = 50
SINGLE_RUNS = 3
WORKLOAD = ["sleep", "1000"]


@dataclass
class Timing:
    """Wall-clock seconds of a batch and of each operation in it."""

    total: float
    latencies: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p90(self) -> float:
        # Nearest-rank percentile, so the value is one that was measured.
        ordered = sorted(self.latencies)
        return ordered[max(0, -(-len(ordered) * 9 // 10) - 1)]


def pod_config(name: str) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=str(uuid.uuid4())),
        hostname=name,
    )


def workload_config(image: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="main"),
        image=cri.ImageSpec(image=image),
        command=WORKLOAD,
    )


async def start_pod(runtime: cri.RuntimeServiceStub, image: str, name: str) -> tuple[str, float]:
    """Run one sandbox with one started container, and return the sandbox id and the seconds."""
    started = time.perf_counter()
    pod = pod_config(name)
    sandbox = await runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod))
    created = await runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox.pod_sandbox_id, config=workload_config(image), sandbox_config=pod))
    await runtime.start_container(cri.StartContainerRequest(container_id=created.container_id))
    return sandbox.pod_sandbox_id, time.perf_counter() - started


async def timed_batch(operations: list) -> tuple[Timing, list]:  # type: ignore[type-arg]
    """Await coroutines that return ``(result, seconds)`` together, and time the whole batch."""
    started = time.perf_counter()
    outcomes = await asyncio.gather(*operations)
    total = time.perf_counter() - started
    return Timing(total, [seconds for _, seconds in outcomes]), [result for result, _ in outcomes]


async def timed_call(call) -> tuple[None, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    await call
    return None, time.perf_counter() - started


class RuncReference:
    """A busybox bundle run with bare runc under a private ``--root``."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-runc-", dir="/tmp"))
        self.root = self.workdir / "runc-root"
        self.bundle = self.workdir / "bundle"
        self.ids: list[str] = []

    def prepare(self) -> None:
        """Write a read-only rootfs with /bin/busybox and a config.json from ``runc spec``."""
        rootfs = self.bundle / "rootfs"
        for directory in ("bin", "dev", "proc", "sys", "tmp"):
            (rootfs / directory).mkdir(parents=True)
        shutil.copy2(BUSYBOX_BINARY, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sleep").symlink_to("busybox")
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        config_path = self.bundle / "config.json"
        spec = json.loads(config_path.read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = WORKLOAD
        spec["root"] = {"path": str(rootfs), "readonly": True}
        config_path.write_text(json.dumps(spec))

    async def run(self, container_id: str) -> tuple[str, float]:
        self.ids.append(container_id)
        # The detached container inherits runc's stdio, so a pipe would never reach EOF. Errors
        # from runc go to a file instead.
        errors = self.workdir / f"{container_id}.err"
        with open(errors, "wb") as stderr:  # noqa: ASYNC230 - a local file, opened once per run
            started = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                "runc", "--root", str(self.root), "run", "-d", "--bundle", str(self.bundle),
                container_id, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )
            await process.wait()
            seconds = time.perf_counter() - started
        if process.returncode != 0:
            message = errors.read_text(errors="replace").strip()
            raise RuntimeError(f"runc run {container_id} failed: {message}")
        return container_id, seconds

    def remove_all(self) -> None:
        for container_id in self.ids:
            subprocess.run(["runc", "--root", str(self.root), "delete", "--force", container_id],
                           capture_output=True, check=False)
        self.ids.clear()

    def cleanup(self) -> None:
        self.remove_all()
        shutil.rmtree(self.workdir, ignore_errors=True)


def print_timing(label: str, timing: Timing) -> None:
    print(f"{label:<52} total {timing.total:7.3f} s   median {timing.median:6.3f} s   "
          f"p90 {timing.p90:6.3f} s")


async def measure_runc(reference: RuncReference) -> tuple[Timing, Timing]:
    reference.prepare()
    single_latencies = []
    for i in range(SINGLE_RUNS):
        _, seconds = await reference.run(f"one-{i}")
        single_latencies.append(seconds)
    sequential = Timing(statistics.median(single_latencies), single_latencies)
    concurrent, _ = await timed_batch([reference.run(f"many-{i}") for i in range(CONCURRENT)])
    reference.remove_all()
    return sequential, concurrent


def start_profiler(daemon: Daemon, output: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling the daemon's Python stacks, idle frames included."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise FileNotFoundError(f"py-spy not found at {py_spy}: run .venv/bin/pip install py-spy")
    assert daemon.process is not None
    return subprocess.Popen(
        [str(py_spy), "record", "--pid", str(daemon.process.pid), "--format", "raw",
         "--rate", "200", "--idle", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    # py-spy writes its output file when interrupted.
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


async def measure_servin(
    daemon: Daemon, image: str, profile: Path | None
) -> tuple[Timing, Timing, Timing, Timing]:
    runtime = daemon.runtime
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    single_latencies = []
    singles = []
    for i in range(SINGLE_RUNS):
        sandbox_id, seconds = await start_pod(runtime, image, f"single-{i}")
        singles.append(sandbox_id)
        single_latencies.append(seconds)
    sequential = Timing(statistics.median(single_latencies), single_latencies)

    profiler = start_profiler(daemon, profile) if profile else None
    try:
        if profiler is not None:
            await asyncio.sleep(1.0)  # py-spy needs a moment to attach
        concurrent, sandbox_ids = await timed_batch(
            [start_pod(runtime, image, f"many-{i}") for i in range(CONCURRENT)])
    finally:
        if profiler is not None:
            stop_profiler(profiler)
    stop, _ = await timed_batch([timed_call(runtime.stop_pod_sandbox(
        cri.StopPodSandboxRequest(pod_sandbox_id=s))) for s in sandbox_ids])
    remove, _ = await timed_batch([timed_call(runtime.remove_pod_sandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=s))) for s in sandbox_ids])
    for sandbox_id in singles:
        await runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        await runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    return sequential, concurrent, stop, remove


def report(runc_one: Timing, runc_many: Timing, servin_one: Timing, servin_many: Timing,
           stop: Timing, remove: Timing) -> None:
    print(f"\nsingle = median of {SINGLE_RUNS} sequential runs; concurrent = {CONCURRENT} at once")
    print_timing("runc run -d, single", runc_one)
    print_timing(f"runc run -d, {CONCURRENT} concurrent", runc_many)
    print_timing("servin-shim pod+container start, single", servin_one)
    print_timing(f"servin-shim pod+container start, {CONCURRENT} concurrent", servin_many)
    print_timing(f"StopPodSandbox, {CONCURRENT} concurrent", stop)
    print_timing(f"RemovePodSandbox, {CONCURRENT} concurrent", remove)
    print()
    print(f"servin-shim {CONCURRENT} concurrent / ({CONCURRENT} x single): "
          f"{servin_many.total / (CONCURRENT * servin_one.total):.3f}")
    print(f"runc {CONCURRENT} concurrent / ({CONCURRENT} x single):        "
          f"{runc_many.total / (CONCURRENT * runc_one.total):.3f}")
    print(f"servin-shim / runc, single:              {servin_one.total / runc_one.total:.2f}")
    print(f"servin-shim / runc, {CONCURRENT} concurrent total:  "
          f"{servin_many.total / runc_many.total:.2f}")
    print(f"servin-shim / runc, {CONCURRENT} concurrent median: "
          f"{servin_many.median / runc_many.median:.2f}")


async def main(profile: Path | None) -> None:
    registry = Registry()
    daemon = Daemon()
    reference = RuncReference()
    try:
        registry.start()
        image = push_image(registry.host, "bench/busybox", "1", busybox_image())
        runc_one, runc_many = await measure_runc(reference)
        daemon.start()
        servin = await measure_servin(daemon, image, profile)
        report(runc_one, runc_many, *servin)
    finally:
        reference.cleanup()
        daemon.cleanup()
        registry.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="write py-spy collapsed stacks of the daemon during the "
                             "concurrent starts to FILE")
    asyncio.run(main(parser.parse_args().profile))
