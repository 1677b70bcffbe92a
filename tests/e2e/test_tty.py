"""Containers with a terminal: the runtime's pty output reaches the CRI log as stdout."""

from __future__ import annotations

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import container_config, run_container, sandbox_config, wait_for_state
from tests.support.daemon import Daemon


async def test_tty_container_logs_terminal_output(daemon: Daemon, busybox_ref: str) -> None:
    await daemon.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_ref)))
    pod = sandbox_config("tty", log_directory=daemon.logs)
    sandbox_id = (await daemon.runtime.run_pod_sandbox(
        cri.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    config = container_config(busybox_ref, "tty", log_path="tty.log", command=[
        "sh", "-c", "[ -t 1 ] && echo terminal; echo to-stderr >&2; exit 4"])
    config.tty = True

    container_id = await run_container(daemon.runtime, sandbox_id, pod, config)
    status = await wait_for_state(daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)

    records = [line.split(" ", 1)[1] for line in
               (daemon.logs / "tty.log").read_text().splitlines()]
    assert status.exit_code == 4
    # A terminal has one stream, and the pty's CR before each LF is not part of the text.
    assert records == ["stdout F terminal", "stdout F to-stderr"]
    assert list((daemon.state / "console").iterdir()) == []
