"""Container logs end to end: ReopenContainerLog, long-line splitting and daemon rotation."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod, wait_for_state
from tests.support.daemon import Daemon

RECORD = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")

#: Writes 0, 1, 2, ... one number per line, pausing briefly every 50 lines.
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); [ $((i % 50)) = 0 ] && usleep 2000; done"


def records(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """Return (stream, tag, text) of every record in a CRI log file."""
    result = []
    for line in path.read_bytes().splitlines():
        match = RECORD.match(line)
        assert match is not None, line
        result.append((match.group(2), match.group(3), match.group(4)))
    return result


def numbers(*paths: Path) -> list[int]:
    return [int(text) for path in paths for _, _, text in records(path)]


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[Pod]:
    yield await Pod.start(daemon, busybox_ref, "logs")


async def wait_for_lines(path: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() or path.read_bytes().count(b"\n") < count:
        assert time.monotonic() < deadline, f"{path} has fewer than {count} lines"
        await asyncio.sleep(0.02)


async def test_reopen_after_rename_keeps_every_line(pod: Pod) -> None:
    container_id = await pod.run("counter", COUNTER)
    current = pod.daemon.logs / "counter.log"
    renamed = pod.daemon.logs / "counter.log.20240101-000000"
    await wait_for_lines(current, 200)

    current.rename(renamed)
    await asyncio.sleep(0.05)
    await pod.daemon.runtime.reopen_container_log(
        cri.ReopenContainerLogRequest(container_id=container_id))
    await wait_for_lines(current, 200)
    await pod.daemon.runtime.stop_container(
        cri.StopContainerRequest(container_id=container_id, timeout=0))

    old, new = numbers(renamed), numbers(current)
    assert len(old) > 200
    assert len(new) >= 200
    assert old + new == list(range(len(old) + len(new)))


async def test_reopen_of_exited_container_fails(pod: Pod) -> None:
    container_id = await pod.run("short", "echo bye")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    with pytest.raises(GRPCError) as caught:
        await pod.daemon.runtime.reopen_container_log(
            cri.ReopenContainerLogRequest(container_id=container_id))

    assert caught.value.status == Status.FAILED_PRECONDITION


async def test_long_line_splits_into_partials(pod: Pod) -> None:
    container_id = await pod.run("long", "head -c 40960 /dev/zero | tr '\\0' x; echo; echo after")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    got = records(pod.daemon.logs / "long.log")

    assert [tag for _, tag, _ in got] == [b"P", b"P", b"F", b"F"]
    assert [len(text) for _, _, text in got[:3]] == [16384, 16384, 8192]
    assert b"".join(text for _, _, text in got[:3]) == b"x" * 40960
    assert got[3] == (b"stdout", b"F", b"after")


async def test_daemon_rotates_logs_by_size(busybox_ref: str) -> None:
    with Daemon({"container": {"logMaxSize": "1KiB", "logMaxFiles": 3}}) as daemon:
        pod = await Pod.start(daemon, busybox_ref, "logs")
        container_id = await pod.run("rotated", "seq 0 199")
        await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

        files = sorted(p.name for p in daemon.logs.iterdir() if p.name.startswith("rotated"))
        assert files == ["rotated.log", "rotated.log.1", "rotated.log.2"]
        for name in files:
            assert (daemon.logs / name).stat().st_size <= 1024
        kept = numbers(*(daemon.logs / name for name in
                         ("rotated.log.2", "rotated.log.1", "rotated.log")))
        assert kept == list(range(200 - len(kept), 200))
