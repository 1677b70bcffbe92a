"""The daemon process: its socket, a second daemon, restarts that keep containers running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
from pathlib import Path

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import SERVIN_BINARY, Daemon, process_alive


async def test_socket_and_directory_modes(daemon: Daemon) -> None:
    socket_mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    directory_mode = stat.S_IMODE(daemon.socket.parent.stat().st_mode)

    assert socket_mode == 0o660
    assert directory_mode == 0o711


async def test_second_daemon_on_socket_refuses(daemon: Daemon) -> None:
    second = subprocess.run(
        [SERVIN_BINARY, "--root", str(daemon.workdir / "root2"),
         "--state-dir", str(daemon.workdir / "state2"), "--cri-socket", str(daemon.socket)],
        capture_output=True, timeout=60, check=False,
    )

    assert second.returncode != 0
    assert b"another daemon is serving on" in second.stderr
    assert str(daemon.socket).encode() in second.stderr
    version = await daemon.runtime.version(cri.VersionRequest())
    assert version.runtime_name == "servin-shim"


async def test_stale_socket_is_replaced() -> None:
    server = Daemon()
    try:
        server.socket.parent.mkdir(parents=True)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(server.socket))
        stale.close()

        server.start()
        version = await server.runtime.version(cri.VersionRequest())

        assert version.runtime_name == "servin-shim"
        assert "removing stale socket" in server.log_text()
    finally:
        server.cleanup()


async def test_restart_keeps_containers_and_their_output(busybox_ref: str) -> None:
    server = Daemon()
    try:
        server.start()
        await server.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
        pod = sandbox_config("restart", log_directory=server.logs)
        sandbox_id = (await server.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
        counter = container_config(
            busybox_ref, "counter", log_path="counter.log",
            command=["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.02; done"],
        )
        exiter = container_config(busybox_ref, "exiter", log_path="exiter.log",
                                  command=["sh", "-c", "sleep 1; echo bye; exit 7"])
        counter_id = await run_container(server.runtime, sandbox_id, pod, counter)
        exiter_id = await run_container(server.runtime, sandbox_id, pod, exiter)
        await wait_for_state(server.runtime, counter_id, cri.ContainerState.CONTAINER_RUNNING)
        info = (await server.runtime.container_status(
            cri.ContainerStatusRequest(container_id=counter_id, verbose=True))).info["info"]
        pid = json.loads(info)["pid"]

        # A crash: the daemon gets no chance to detach its shims.
        server.stop(signal.SIGKILL)
        lines_while_down = len((server.logs / "counter.log").read_text().splitlines())
        await asyncio.sleep(2.0)
        assert process_alive(pid)

        server.start()
        listed = await server.runtime.list_containers(cri.ListContainersRequest())
        sandboxes = await server.runtime.list_pod_sandbox(cri.ListPodSandboxRequest())
        exited = await server.runtime.container_status(
            cri.ContainerStatusRequest(container_id=exiter_id))
        await server.runtime.stop_container(
            cri.StopContainerRequest(container_id=counter_id, timeout=0))
        stopped = await wait_for_state(server.runtime, counter_id,
                                       cri.ContainerState.CONTAINER_EXITED)

        states = {c.id: c.state for c in listed.containers}
        assert states[counter_id] == cri.ContainerState.CONTAINER_RUNNING
        assert states[exiter_id] == cri.ContainerState.CONTAINER_EXITED
        assert [(s.id, s.state) for s in sandboxes.items] == [
            (sandbox_id, cri.PodSandboxState.SANDBOX_READY)]
        assert exited.status is not None
        assert exited.status.exit_code == 7
        assert exited.status.reason == "Error"
        assert stopped.exit_code == 128 + 9
        numbers = [int(line.split()[-1]) for line in
                   (server.logs / "counter.log").read_text().splitlines()]
        assert len(numbers) > lines_while_down
        assert numbers == list(range(1, len(numbers) + 1))
        assert (server.logs / "exiter.log").read_text().rstrip().endswith("stdout F bye")
        assert not process_alive(pid)
    finally:
        server.cleanup()


async def test_graceful_stop_leaves_containers_running(busybox_ref: str) -> None:
    server = Daemon()
    try:
        server.start()
        await server.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
        pod = sandbox_config("graceful", log_directory=server.logs)
        sandbox_id = (await server.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
        sleeper = container_config(busybox_ref, "sleeper", command=["sleep", "1000"])
        container_id = await run_container(server.runtime, sandbox_id, pod, sleeper)
        info = (await server.runtime.container_status(
            cri.ContainerStatusRequest(container_id=container_id, verbose=True))).info["info"]
        pid = json.loads(info)["pid"]

        returncode = server.stop(signal.SIGTERM)
        alive_after_stop = process_alive(pid)
        server.start()
        status = await server.runtime.container_status(
            cri.ContainerStatusRequest(container_id=container_id))

        assert returncode == 0
        assert alive_after_stop
        assert status.status is not None
        assert status.status.state == cri.ContainerState.CONTAINER_RUNNING
        assert "adopted running container" in server.log_text()
    finally:
        server.cleanup()


async def test_metadata_survives_daemon_kill(busybox_ref: str) -> None:
    server = Daemon()
    try:
        server.start()
        await server.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
        pod = sandbox_config("persist")
        sandbox_id = (await server.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id

        server.stop(signal.SIGKILL)
        server.start()
        images = await server.images.list_images(cri.ListImagesRequest())
        status = await server.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))

        assert [list(i.repo_tags) for i in images.images] == [[busybox_ref]]
        assert status.status is not None
        assert status.status.state == cri.PodSandboxState.SANDBOX_READY
        assert status.status.labels == {"app": "persist"}
    finally:
        server.cleanup()


async def test_restart_cleans_unclaimed_leftovers(busybox_ref: str) -> None:
    server = Daemon()
    try:
        server.start()
        pod = sandbox_config("orphan")
        sandbox_id = (await server.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
        server.stop(signal.SIGKILL)
        # A crash between the side effects and the commit leaves them without a record.
        with sqlite3.connect(server.root / "servin.db") as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

        server.start()

        assert server.runc_containers() == []
        assert server.mounts() == []
        assert not (server.state / "netns" / sandbox_id).exists()
        assert not (server.state / "sandboxes" / sandbox_id).exists()
        assert not Path(f"/sys/fs/cgroup/memory/servin/{sandbox_id}").exists()
        log_text = server.log_text()
        assert f"removed runtime container that no record claims id={sandbox_id}" in log_text
        assert f"removed network namespace that no sandbox claims id={sandbox_id}" in log_text
    finally:
        server.cleanup()


async def test_monitor_death_keeps_exit_codes(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("monitorless", log_directory=daemon.logs)
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    exiter = container_config(busybox_ref, "exiter", command=["sh", "-c", "sleep 1; exit 11"])
    sleeper = container_config(busybox_ref, "sleeper", command=["sleep", "1000"])
    exiter_id = await run_container(daemon.runtime, sandbox_id, pod, exiter)
    sleeper_id = await run_container(daemon.runtime, sandbox_id, pod, sleeper)
    monitor = daemon.monitor_pid()
    assert monitor is not None

    os.kill(monitor, signal.SIGKILL)
    exited = await wait_for_state(daemon.runtime, exiter_id, cri.ContainerState.CONTAINER_EXITED)
    await daemon.runtime.stop_container(
        cri.StopContainerRequest(container_id=sleeper_id, timeout=1))
    stopped = await wait_for_state(daemon.runtime, sleeper_id,
                                   cri.ContainerState.CONTAINER_EXITED, timeout=10)
    # A new monitor serves the next container.
    again = await run_container(daemon.runtime, sandbox_id, pod, container_config(
        busybox_ref, "again", command=["sh", "-c", "exit 5"]))
    after = await wait_for_state(daemon.runtime, again, cri.ContainerState.CONTAINER_EXITED)

    assert exited.exit_code == 11
    assert stopped.exit_code == 128 + 9
    assert after.exit_code == 5


def run_second_daemon(*flags: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SERVIN_BINARY, *flags], capture_output=True, timeout=60, check=False)


async def test_second_daemon_on_same_root_refuses(daemon: Daemon) -> None:
    second = await asyncio.to_thread(
        run_second_daemon, "--root", str(daemon.root), "--state-dir",
        str(daemon.workdir / "state2"), "--cri-socket", str(daemon.workdir / "other.sock"))

    assert second.returncode == 1
    assert f"another servin-shim daemon uses {daemon.root} (--root)".encode() in second.stderr
    assert b"Traceback" not in second.stderr


async def test_cri_port_in_use_fails_cleanly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = Daemon({"criPort": f"127.0.0.1:{port}"})
        try:
            result = await asyncio.to_thread(
                run_second_daemon, "--cri-config", str(server.config_path), "--root",
                str(server.root), "--state-dir", str(server.state), "--cri-socket",
                str(server.socket))

            assert result.returncode == 1
            assert b"cannot listen for CRI requests" in result.stderr
            assert b"Traceback" not in result.stderr
            assert not server.socket.exists()
        finally:
            server.cleanup()


async def test_shutdown_lets_running_stop_finish(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("drain")
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    stubborn = container_config(busybox_ref, "stubborn", command=["sleep", "1000"])
    container_id = await run_container(daemon.runtime, sandbox_id, pod, stubborn)
    await wait_for_state(daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)
    assert daemon.process is not None

    # sleep as PID 1 ignores SIGTERM, so the stop waits its whole 2 s grace period.
    stopping = asyncio.create_task(daemon.runtime.stop_container(
        cri.StopContainerRequest(container_id=container_id, timeout=2)))
    await asyncio.sleep(0.5)
    daemon.process.send_signal(signal.SIGTERM)
    await stopping
    returncode = await asyncio.to_thread(daemon.process.wait, 30)

    assert returncode == 0
    assert "new RPCs get UNAVAILABLE" in daemon.log_text()
