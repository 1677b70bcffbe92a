"""gRPC status codes a client can act on, and both CRI API versions on one socket."""

from __future__ import annotations

import grpclib.const
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from servin_shim.api.runtime import v1 as cri
from servin_shim.api.runtime import v1alpha2
from tests.e2e.helpers import sandbox_config
from tests.support.daemon import Daemon

UNKNOWN_ID = "0" * 64


async def test_unknown_container_is_not_found(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.container_status(cri.ContainerStatusRequest(container_id=UNKNOWN_ID))

    assert error.value.status is Status.NOT_FOUND
    assert UNKNOWN_ID in (error.value.message or "")


async def test_unknown_sandbox_is_not_found(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.pod_sandbox_status(
            cri.PodSandboxStatusRequest(pod_sandbox_id=UNKNOWN_ID))

    assert error.value.status is Status.NOT_FOUND
    assert UNKNOWN_ID in (error.value.message or "")


async def test_create_in_unknown_sandbox_is_not_found(daemon: Daemon, busybox_ref: str) -> None:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="x"),
                                 image=cri.ImageSpec(image=busybox_ref))
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.create_container(
            cri.CreateContainerRequest(pod_sandbox_id=UNKNOWN_ID, config=config))

    assert error.value.status is Status.NOT_FOUND


async def test_sandbox_without_metadata_is_invalid(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.run_pod_sandbox(
            cri.RunPodSandboxRequest(config=cri.PodSandboxConfig(hostname="h")))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "metadata" in (error.value.message or "")


async def test_unknown_runtime_handler_lists_configured(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(
            config=sandbox_config("handler"), runtime_handler="kata"))

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "'kata'" in (error.value.message or "")
    assert "runc" in (error.value.message or "")


async def test_container_of_missing_image_is_not_found(daemon: Daemon) -> None:
    config = sandbox_config("noimage")
    run = await daemon.runtime.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))
    container = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="x"),
                                    image=cri.ImageSpec(image="127.0.0.1:1/absent:1"))

    with pytest.raises(GRPCError) as error:
        await daemon.runtime.create_container(cri.CreateContainerRequest(
            pod_sandbox_id=run.pod_sandbox_id, config=container, sandbox_config=config))

    assert error.value.status is Status.NOT_FOUND
    assert "127.0.0.1:1/absent:1" in (error.value.message or "")


async def test_stop_and_remove_of_unknown_sandbox_succeed(daemon: Daemon) -> None:
    await daemon.runtime.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=UNKNOWN_ID))
    await daemon.runtime.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=UNKNOWN_ID))


async def test_unimplemented_rpc_is_unimplemented(daemon: Daemon) -> None:
    with pytest.raises(GRPCError) as error:
        await daemon.runtime.checkpoint_container(
            cri.CheckpointContainerRequest(container_id=UNKNOWN_ID))

    assert error.value.status is Status.UNIMPLEMENTED


async def test_v1alpha2_client_is_served(daemon: Daemon, busybox_ref: str) -> None:
    assert daemon.channel is not None
    runtime = v1alpha2.RuntimeServiceStub(daemon.channel)
    images = v1alpha2.ImageServiceStub(daemon.channel)

    version = await runtime.version(v1alpha2.VersionRequest(version="0.1.0"))
    await images.pull_image(v1alpha2.PullImageRequest(image=v1alpha2.ImageSpec(image=busybox_ref)))
    listed = await images.list_images(v1alpha2.ListImagesRequest())
    run = await runtime.run_pod_sandbox(v1alpha2.RunPodSandboxRequest(
        config=v1alpha2.PodSandboxConfig(metadata=v1alpha2.PodSandboxMetadata(
            name="old", namespace="default", uid="u-1"))))
    status = await runtime.pod_sandbox_status(
        v1alpha2.PodSandboxStatusRequest(pod_sandbox_id=run.pod_sandbox_id))

    assert version.runtime_api_version == "v1alpha2"
    assert version.runtime_name == "servin-shim"
    assert [busybox_ref] in [list(i.repo_tags) for i in listed.images]
    assert status.status is not None
    assert status.status.state == v1alpha2.PodSandboxState.SANDBOX_READY


async def test_version_reports_v1(daemon: Daemon) -> None:
    version = await daemon.runtime.version(cri.VersionRequest())

    assert version.runtime_api_version == "v1"
    assert version.runtime_name == "servin-shim"


async def test_status_network_not_ready_for_cni(daemon: Daemon) -> None:
    reply = await daemon.runtime.status(cri.StatusRequest())

    assert reply.status is not None
    conditions = {c.type: c for c in reply.status.conditions}
    assert conditions["RuntimeReady"].status
    assert not conditions["NetworkReady"].status
    assert conditions["NetworkReady"].reason == "NetworkPluginNotReady"
    assert "spec.network.plugin" in conditions["NetworkReady"].message


async def test_status_network_ready_without_plugin() -> None:
    server = Daemon({"network": {"plugin": "none"}})
    try:
        server.start()
        reply = await server.runtime.status(cri.StatusRequest())
    finally:
        server.cleanup()

    assert reply.status is not None
    conditions = {c.type: c.status for c in reply.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}


async def test_invalid_utf8_string_is_invalid_argument(daemon: Daemon) -> None:
    assert daemon.channel is not None
    # ContainerStatusRequest field 1 (container_id) as a string of bytes that are not UTF-8.
    payload = b"\x0a\x02\xff\xfe"

    async with daemon.channel.request(
        "/runtime.v1.RuntimeService/ContainerStatus",
        grpclib.const.Cardinality.UNARY_UNARY,
        RawBytes,
        RawBytes,
    ) as stream:
        await stream.send_message(RawBytes(payload), end=True)
        with pytest.raises(GRPCError) as error:
            await stream.recv_message()

    assert error.value.status is Status.INVALID_ARGUMENT
    assert "UTF-8" in (error.value.message or "")


class RawBytes:
    """A message type that passes its bytes through grpclib's codec unchanged."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - the name grpclib's codec calls
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> RawBytes:  # noqa: N802 - the name grpclib's codec calls
        return cls(data)
