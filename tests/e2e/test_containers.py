"""Container lifecycle details on real runc: exit codes, stop signals and timeouts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from servin_shim.api.runtime import v1 as cri
from tests.e2e.helpers import Pod, container_config, run_container, wait_for_state
from tests.support.daemon import Daemon


@pytest.fixture
async def pod(daemon: Daemon, busybox_ref: str) -> AsyncIterator[Pod]:
    yield await Pod.start(daemon, busybox_ref, "containers")


async def test_exit_code_zero_is_completed(pod: Pod) -> None:
    container_id = await pod.run("ok", "true")

    status = await wait_for_state(pod.daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)

    assert status.exit_code == 0
    assert status.reason == "Completed"


async def test_stop_kills_container_ignoring_sigterm(pod: Pod) -> None:
    container_id = await pod.run("stubborn", "trap '' TERM; echo ready; while true; do sleep 0.1; done")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)

    await pod.daemon.runtime.stop_container(
        cri.StopContainerRequest(container_id=container_id, timeout=1))

    status = await wait_for_state(pod.daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)
    assert status.exit_code == 128 + 9


async def test_stop_delivers_sigterm_first(pod: Pod) -> None:
    container_id = await pod.run("polite", "trap 'exit 5' TERM; while true; do sleep 0.1; done")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)

    await pod.daemon.runtime.stop_container(
        cri.StopContainerRequest(container_id=container_id, timeout=30))

    status = await wait_for_state(pod.daemon.runtime, container_id,
                                  cri.ContainerState.CONTAINER_EXITED)
    assert status.exit_code == 5


async def test_stop_and_remove_are_idempotent(pod: Pod) -> None:
    container_id = await pod.run("twice", "sleep 100")
    runtime = pod.daemon.runtime

    await runtime.stop_container(cri.StopContainerRequest(container_id=container_id, timeout=0))
    await runtime.stop_container(cri.StopContainerRequest(container_id=container_id, timeout=0))
    await runtime.remove_container(cri.RemoveContainerRequest(container_id=container_id))
    await runtime.remove_container(cri.RemoveContainerRequest(container_id=container_id))
    await runtime.stop_container(cri.StopContainerRequest(container_id=container_id, timeout=0))

    listed = await runtime.list_containers(cri.ListContainersRequest())
    assert listed.containers == []


async def test_remove_running_container_kills_it(pod: Pod) -> None:
    container_id = await pod.run("running", "sleep 100")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_RUNNING)

    await pod.daemon.runtime.remove_container(cri.RemoveContainerRequest(container_id=container_id))

    assert pod.daemon.runc_containers() == [pod.sandbox_id]


async def test_env_args_and_workdir_reach_process(pod: Pod) -> None:
    config = container_config(
        pod.image, "env", command=["sh", "-c"], args=['echo "$GREETING $PWD"'],
        envs={"GREETING": "hello"}, working_dir="/tmp", log_path="env.log",
    )
    container_id = await run_container(pod.daemon.runtime, pod.sandbox_id, pod.config, config)
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    log_text = (pod.daemon.logs / "env.log").read_text()
    assert log_text.rstrip("\n").endswith("stdout F hello /tmp")


async def test_two_containers_share_network_namespace(pod: Pod) -> None:
    first = await pod.run("first", "readlink /proc/self/ns/net")
    second = await pod.run("second", "readlink /proc/self/ns/net")
    for container_id in (first, second):
        await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    first_ns = (pod.daemon.logs / "first.log").read_text().split()[-1]
    second_ns = (pod.daemon.logs / "second.log").read_text().split()[-1]
    assert first_ns.startswith("net:[")
    assert first_ns == second_ns


async def test_pod_network_has_only_loopback_up(pod: Pod) -> None:
    container_id = await pod.run("links", "ls /sys/class/net; cat /sys/class/net/lo/flags")
    await wait_for_state(pod.daemon.runtime, container_id, cri.ContainerState.CONTAINER_EXITED)

    output = [line.split()[-1] for line in
              (pod.daemon.logs / "links.log").read_text().splitlines()]
    assert output[:-1] == ["lo"]
    # IFF_UP is bit 0 of the interface flags.
    assert int(output[-1], 16) & 0x1


async def test_list_filters_select_records(pod: Pod) -> None:
    running = await pod.run("running", "sleep 100")
    exited = await pod.run("exited", "true")
    await wait_for_state(pod.daemon.runtime, exited, cri.ContainerState.CONTAINER_EXITED)
    runtime = pod.daemon.runtime

    by_label = await runtime.list_containers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(label_selector={"container": "running"})))
    by_prefix = await runtime.list_containers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(id=exited[:12], pod_sandbox_id=pod.sandbox_id[:12])))
    by_state = await runtime.list_containers(cri.ListContainersRequest(filter=cri.ContainerFilter(
        state=cri.ContainerStateValue(state=cri.ContainerState.CONTAINER_EXITED))))
    other_pod = await runtime.list_containers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id="f" * 12)))
    pods = await runtime.list_pod_sandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(label_selector={"app": "containers"})))
    no_pods = await runtime.list_pod_sandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(label_selector={"app": "other"})))

    assert [c.id for c in by_label.containers] == [running]
    assert [c.id for c in by_prefix.containers] == [exited]
    assert [c.id for c in by_state.containers] == [exited]
    assert other_pod.containers == []
    assert [p.id for p in pods.items] == [pod.sandbox_id]
    assert no_pods.items == []
