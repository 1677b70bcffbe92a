"""Benchmark the resident memory of the exit monitor and the daemon as containers are added.

It starts a real daemon, measures both processes with 0, 10 and 50 running pods (one
``sleep 1000`` container per pod, so the monitor watches two inits per pod: the catatonit infra
and the workload), and prints the increment per container. As a reference it measures one
pod's ``catatonit -P`` infra process and a bare ``python3 -S`` that only sleeps: the least a
per-container Python monitor would cost. The script prints numbers and asserts none of them.

Run as root from the repository root: ``.venv/bin/python benchmarks/monitor_memory.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from servin_shim.api.runtime import v1 as cri
from tests.support.daemon import Daemon
from tests.support.imagebuild import busybox_image, push_image
from tests.support.registry import Registry

log = logging.getLogger(__name__)

POD_COUNTS = (0, 10, 50)
# Seconds to let freed memory and lazy allocations settle before a reading.
SETTLE_SECONDS = 1.0
PYTHON_REFERENCE = ["/usr/bin/python3", "-S", "-c", "import time; time.sleep(100)"]
KIB_PER_MIB = 1024


@dataclass(frozen=True)
class Memory:
    """Memory of one process in KiB: resident, private anonymous, and proportional share."""

    rss: int
    anon: int
    pss: int

    @staticmethod
    def of(pid: int) -> Memory:
        """Read VmRSS and RssAnon from /proc/PID/status and Pss from /proc/PID/smaps_rollup."""
        status = _kib_fields(Path(f"/proc/{pid}/status").read_text())
        rollup = _kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
        return Memory(rss=status["VmRSS"], anon=status["RssAnon"], pss=rollup["Pss"])


def _kib_fields(text: str) -> dict[str, int]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0])
    return fields


def mib(kib: float) -> str:
    return f"{kib / KIB_PER_MIB:7.2f} MiB"


async def start_pod(runtime: cri.RuntimeServiceStub, image: str, index: int) -> str:
    name = f"mem-{index}"
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=str(uuid.uuid4())),
        hostname=name,
    )
    sandbox = await runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod))
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="main"),
        image=cri.ImageSpec(image=image),
        command=["sleep", "1000"],
    )
    created = await runtime.create_container(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox.pod_sandbox_id, config=config, sandbox_config=pod))
    await runtime.start_container(cri.StartContainerRequest(container_id=created.container_id))
    return sandbox.pod_sandbox_id


def infra_pid(daemon: Daemon, sandbox_id: str) -> int:
    """Return the pid of a sandbox's infra process, whose runc container id is the sandbox id."""
    out = subprocess.run(["runc", "--root", str(daemon.state / "runc"), "state", sandbox_id],
                         capture_output=True, check=True).stdout
    return int(json.loads(out)["pid"])


def python_reference() -> Memory:
    """Start the minimal sleeping Python, read its memory once it sleeps, and stop it."""
    process = subprocess.Popen(PYTHON_REFERENCE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        # "S (sleeping)" alone could be the interpreter loading, so wait for the settle time too.
        while "State:\tS" not in Path(f"/proc/{process.pid}/status").read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out waiting for python reference pid={process.pid} to sleep")
            time.sleep(0.05)
        time.sleep(SETTLE_SECONDS)
        return Memory.of(process.pid)
    finally:
        process.kill()
        process.wait()


def print_row(label: str, memory: Memory) -> None:
    print(f"{label:<34} VmRSS {mib(memory.rss)}   RssAnon {mib(memory.anon)}   "
          f"Pss {mib(memory.pss)}")


def print_increment(label: str, low: Memory, high: Memory, containers: int) -> None:
    print(f"{label:<34} VmRSS {(high.rss - low.rss) / containers:7.1f} KiB   "
          f"RssAnon {(high.anon - low.anon) / containers:7.1f} KiB   "
          f"Pss {(high.pss - low.pss) / containers:7.1f} KiB")


async def measure(daemon: Daemon, image: str) -> None:
    runtime = daemon.runtime
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    assert daemon.process is not None
    sandbox_ids: list[str] = []
    readings: dict[int, tuple[Memory, Memory]] = {}
    for count in POD_COUNTS:
        added = range(len(sandbox_ids), count)
        sandbox_ids += await asyncio.gather(*(start_pod(runtime, image, i) for i in added))
        await asyncio.sleep(SETTLE_SECONDS)
        monitor = daemon.monitor_pid()
        if monitor is None:
            raise RuntimeError(f"exit monitor is not running; see {daemon.log_file}")
        readings[count] = (Memory.of(daemon.process.pid), Memory.of(monitor))

    print(f"\npods with one running container each: {', '.join(map(str, POD_COUNTS))}")
    for count, (daemon_memory, monitor_memory) in readings.items():
        print_row(f"daemon, {count} containers", daemon_memory)
        print_row(f"monitor, {count} containers", monitor_memory)
    print("\nincrement per container (one pod = infra + workload, both watched by the monitor)")
    steps = [*itertools.pairwise(POD_COUNTS), (POD_COUNTS[0], POD_COUNTS[-1])]
    for low, high in steps:
        for index, name in enumerate(("daemon", "monitor")):
            print_increment(f"{name}, {low} -> {high}", readings[low][index],
                            readings[high][index], high - low)

    catatonit = Memory.of(infra_pid(daemon, sandbox_ids[0]))
    python = python_reference()
    print("\nreference processes")
    print_row("catatonit -P (one pod's infra)", catatonit)
    print_row("python3 -S, sleeping", python)

    largest = POD_COUNTS[-1]
    monitor_at_largest = readings[largest][1]
    # Each process has its own private pages, but all of them share the interpreter's file pages.
    shared = python.rss - python.anon
    print(f"\n{largest} per-container Python monitors, estimated from the sleeping python3 -S")
    print(f"  upper bound, {largest} x VmRSS:                  {mib(largest * python.rss)}")
    lower = largest * python.anon + shared
    print(f"  lower bound, {largest} x RssAnon + shared once:  {mib(lower)}")
    print(f"our one monitor with {largest} containers: VmRSS {mib(monitor_at_largest.rss)}, "
          f"RssAnon {mib(monitor_at_largest.anon)}, Pss {mib(monitor_at_largest.pss)}")

    for sandbox_id in sandbox_ids:
        await runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        await runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


async def main() -> None:
    registry = Registry()
    daemon = Daemon()
    try:
        registry.start()
        image = push_image(registry.host, "bench/busybox", "1", busybox_image())
        daemon.start()
        await measure(daemon, image)
    finally:
        daemon.cleanup()
        registry.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
