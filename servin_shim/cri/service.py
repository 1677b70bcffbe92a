"""The CRI gRPC services, served for ``runtime.v1`` and ``runtime.v1alpha2`` by one set of handlers.

Both API versions use the same field numbers and types for every field they share. So a
v1alpha2 request decodes correctly into the v1 message class, and a v1alpha2 client decodes a
v1 reply correctly, skipping the fields it does not have. One handler per RPC therefore serves
both paths; only Version reports which API version the client used.

Each handler is thin: decode, call the manager, map errors in ``as_grpc_status``, reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import betterproto2
import grpclib.const
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from servin_shim import RUNTIME_NAME, __version__, streaming
from servin_shim.api.runtime import v1 as cri
from servin_shim.cri import convert
from servin_shim.cri.containers import ContainerManager
from servin_shim.cri.context import RuntimeContext
from servin_shim.cri.errors import as_grpc_status
from servin_shim.cri.sandboxes import SandboxManager
from servin_shim.cri.stats import StatsCollector
from servin_shim.errors import FailedPrecondition, InvalidArgument, Unimplemented
from servin_shim.images.auth import RegistryAuth
from servin_shim.state.records import (
    CONTAINER_RUNNING,
    SANDBOX_READY,
    ContainerRecord,
    SandboxRecord,
)

log = logging.getLogger("servin_shim.cri")

Handler = Callable[[Any, str], Awaitable[Any]]

#: Every RuntimeService RPC of runtime.v1, with its request and response classes.
RUNTIME_RPCS: dict[str, tuple[type[betterproto2.Message], type[betterproto2.Message]]] = {
    "Version": (cri.VersionRequest, cri.VersionResponse),
    "RunPodSandbox": (cri.RunPodSandboxRequest, cri.RunPodSandboxResponse),
    "StopPodSandbox": (cri.StopPodSandboxRequest, cri.StopPodSandboxResponse),
    "RemovePodSandbox": (cri.RemovePodSandboxRequest, cri.RemovePodSandboxResponse),
    "PodSandboxStatus": (cri.PodSandboxStatusRequest, cri.PodSandboxStatusResponse),
    "ListPodSandbox": (cri.ListPodSandboxRequest, cri.ListPodSandboxResponse),
    "CreateContainer": (cri.CreateContainerRequest, cri.CreateContainerResponse),
    "StartContainer": (cri.StartContainerRequest, cri.StartContainerResponse),
    "StopContainer": (cri.StopContainerRequest, cri.StopContainerResponse),
    "RemoveContainer": (cri.RemoveContainerRequest, cri.RemoveContainerResponse),
    "ListContainers": (cri.ListContainersRequest, cri.ListContainersResponse),
    "ContainerStatus": (cri.ContainerStatusRequest, cri.ContainerStatusResponse),
    "UpdateContainerResources": (
        cri.UpdateContainerResourcesRequest, cri.UpdateContainerResourcesResponse,
    ),
    "ReopenContainerLog": (cri.ReopenContainerLogRequest, cri.ReopenContainerLogResponse),
    "ExecSync": (cri.ExecSyncRequest, cri.ExecSyncResponse),
    "Exec": (cri.ExecRequest, cri.ExecResponse),
    "Attach": (cri.AttachRequest, cri.AttachResponse),
    "PortForward": (cri.PortForwardRequest, cri.PortForwardResponse),
    "ContainerStats": (cri.ContainerStatsRequest, cri.ContainerStatsResponse),
    "ListContainerStats": (cri.ListContainerStatsRequest, cri.ListContainerStatsResponse),
    "PodSandboxStats": (cri.PodSandboxStatsRequest, cri.PodSandboxStatsResponse),
    "ListPodSandboxStats": (cri.ListPodSandboxStatsRequest, cri.ListPodSandboxStatsResponse),
    "UpdateRuntimeConfig": (cri.UpdateRuntimeConfigRequest, cri.UpdateRuntimeConfigResponse),
    "Status": (cri.StatusRequest, cri.StatusResponse),
    "CheckpointContainer": (cri.CheckpointContainerRequest, cri.CheckpointContainerResponse),
    "ListMetricDescriptors": (
        cri.ListMetricDescriptorsRequest, cri.ListMetricDescriptorsResponse,
    ),
    "ListPodSandboxMetrics": (
        cri.ListPodSandboxMetricsRequest, cri.ListPodSandboxMetricsResponse,
    ),
    "RuntimeConfig": (cri.RuntimeConfigRequest, cri.RuntimeConfigResponse),
}

IMAGE_RPCS: dict[str, tuple[type[betterproto2.Message], type[betterproto2.Message]]] = {
    "ListImages": (cri.ListImagesRequest, cri.ListImagesResponse),
    "ImageStatus": (cri.ImageStatusRequest, cri.ImageStatusResponse),
    "PullImage": (cri.PullImageRequest, cri.PullImageResponse),
    "RemoveImage": (cri.RemoveImageRequest, cri.RemoveImageResponse),
    "ImageFsInfo": (cri.ImageFsInfoRequest, cri.ImageFsInfoResponse),
}

#: The server-streaming RPC of runtime.v1; it has no v1alpha2 counterpart.
STREAMING_RPCS = {"GetContainerEvents": (cri.GetEventsRequest, cri.ContainerEventResponse)}

API_VERSIONS = ("v1", "v1alpha2")


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _request_ids(request: Any) -> str:
    """Return the ids a request names, as ``key=value`` pairs for the log."""
    parts = []
    for field in ("pod_sandbox_id", "container_id"):
        value = getattr(request, field, "")
        if value:
            parts.append(f"{field}={value}")
    image = getattr(request, "image", None)
    if isinstance(image, cri.ImageSpec) and image.image:
        parts.append(f"image={image.image}")
    return " ".join(parts)


class CRIService:
    """Both CRI services; ``__mapping__`` hands grpclib the handlers for both API versions."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.sandboxes = SandboxManager(ctx)
        self.containers = ContainerManager(ctx)
        self.stats = StatsCollector(ctx)
        #: Serves the URLs of Exec, Attach and PortForward; the daemon starts it.
        self.streaming: streaming.StreamingServer | None = None
        #: Set once the daemon shuts down: new RPCs are rejected with UNAVAILABLE.
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout: float) -> int:
        """Reject new RPCs and wait up to ``timeout`` seconds for running ones.

        Returns how many RPCs were still running when the wait ended.
        """
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._in_flight

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping: dict[str, grpclib.const.Handler] = {}
        for version in API_VERSIONS:
            for service, rpcs in (("RuntimeService", RUNTIME_RPCS), ("ImageService", IMAGE_RPCS)):
                for name, (request_type, reply_type) in rpcs.items():
                    path = f"/runtime.{version}.{service}/{name}"
                    mapping[path] = grpclib.const.Handler(
                        self._unary(name, version),
                        grpclib.const.Cardinality.UNARY_UNARY,
                        request_type,
                        reply_type,
                    )
        for name, (request_type, reply_type) in STREAMING_RPCS.items():
            mapping[f"/runtime.v1.RuntimeService/{name}"] = grpclib.const.Handler(
                self._unimplemented_stream(name),
                grpclib.const.Cardinality.UNARY_STREAM,
                request_type,
                reply_type,
            )
        return mapping

    def _unary(self, name: str, version: str) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        method: Handler | None = getattr(self, _snake(name), None)

        async def handle(stream: Stream[Any, Any]) -> None:
            if self.draining:
                raise GRPCError(Status.UNAVAILABLE,
                                f"{RUNTIME_NAME} is shutting down: retry once it has restarted")
            self._in_flight += 1
            self._idle.clear()
            try:
                request = await _receive(stream, name)
                ids = _request_ids(request)
                started = time.monotonic()
                with as_grpc_status(name, ids):
                    if method is None:
                        raise Unimplemented(f"{name} is not implemented by {RUNTIME_NAME}")
                    reply = await method(request, version)
                log.debug("%s %s took %.1fms", name, ids, (time.monotonic() - started) * 1000)
                await stream.send_message(reply)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

        return handle

    def _unimplemented_stream(self, name: str) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def handle(stream: Stream[Any, Any]) -> None:
            await stream.recv_message()
            with as_grpc_status(name, ""):
                raise Unimplemented(f"{name} is not implemented by {RUNTIME_NAME}")

        return handle

    # Runtime information

    async def version(self, request: cri.VersionRequest, api: str) -> cri.VersionResponse:
        return cri.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=api,
        )

    async def status(self, request: cri.StatusRequest, api: str) -> cri.StatusResponse:
        return cri.StatusResponse(
            status=cri.RuntimeStatus(
                conditions=[
                    cri.RuntimeCondition(type="RuntimeReady", status=True),
                    self._network_condition(),
                ]
            ),
            runtime_handlers=[
                cri.RuntimeHandler(name=name) for name in sorted(self.ctx.runtimes)
            ],
        )

    def _network_condition(self) -> cri.RuntimeCondition:
        """Report the pod network as kubelet gates scheduling on it.

        Pods get a private network namespace with loopback only, since no CNI plugin is
        called yet. With ``network.plugin: cni`` that is not the network the operator asked
        for, so the condition is false, as containerd reports a node without a CNI config.
        With ``none`` loopback is what was asked for.
        """
        if self.ctx.config.network.plugin == "none":
            return cri.RuntimeCondition(type="NetworkReady", status=True)
        return cri.RuntimeCondition(
            type="NetworkReady",
            status=False,
            reason="NetworkPluginNotReady",
            message=(
                f"{RUNTIME_NAME} does not call CNI plugins yet, so pods get loopback only; "
                "set spec.network.plugin to none to accept that"
            ),
        )

    async def update_runtime_config(
        self, request: cri.UpdateRuntimeConfigRequest, api: str
    ) -> cri.UpdateRuntimeConfigResponse:
        # The pod CIDR matters only to CNI configurations that are templated from it, which
        # servin-shim does not do: it is accepted and logged.
        cidr = request.runtime_config.network_config.pod_cidr if (
            request.runtime_config and request.runtime_config.network_config
        ) else ""
        log.info("runtime config updated pod_cidr=%s", cidr or "(none)")
        return cri.UpdateRuntimeConfigResponse()

    async def runtime_config(
        self, request: cri.RuntimeConfigRequest, api: str
    ) -> cri.RuntimeConfigResponse:
        """Report the cgroup driver, which kubelet 1.28 and later can use instead of its own
        cgroupDriver setting (feature gate KubeletCgroupDriverFromCRI).

        NOTE: always cgroupfs, because no config key selects runc's systemd driver, which needs
        systemd as PID 1. runc gets --systemd-cgroup only for a cgroup parent that kubelet
        already names in the systemd form (``*.slice``).
        """
        return cri.RuntimeConfigResponse(
            linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CgroupDriver.CGROUPFS)
        )

    # Pod sandboxes

    async def run_pod_sandbox(
        self, request: cri.RunPodSandboxRequest, api: str
    ) -> cri.RunPodSandboxResponse:
        sandbox_id = await self.sandboxes.run(request.config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    async def stop_pod_sandbox(
        self, request: cri.StopPodSandboxRequest, api: str
    ) -> cri.StopPodSandboxResponse:
        _require(request.pod_sandbox_id, "pod_sandbox_id")
        await self.sandboxes.stop(request.pod_sandbox_id, self.containers.stop_all)
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(
        self, request: cri.RemovePodSandboxRequest, api: str
    ) -> cri.RemovePodSandboxResponse:
        _require(request.pod_sandbox_id, "pod_sandbox_id")
        await self.sandboxes.remove(request.pod_sandbox_id, self.containers.remove_all)
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(
        self, request: cri.PodSandboxStatusRequest, api: str
    ) -> cri.PodSandboxStatusResponse:
        record = self.sandboxes.resolve(request.pod_sandbox_id)
        info = convert.sandbox_info(record) if request.verbose else {}
        return cri.PodSandboxStatusResponse(status=convert.pod_sandbox_status(record), info=info)

    async def list_pod_sandbox(
        self, request: cri.ListPodSandboxRequest, api: str
    ) -> cri.ListPodSandboxResponse:
        records = self.ctx.metadata.sandboxes()
        f = request.filter
        if f is not None:
            records = _select(records, f.id, f.label_selector)
            if f.state is not None:
                expected_state = cri.PodSandboxState(f.state.state).name
                records = [r for r in records if r.state == expected_state]
        records.sort(key=lambda r: r.created_at)
        return cri.ListPodSandboxResponse(items=[convert.pod_sandbox(r) for r in records])

    # Containers

    async def create_container(
        self, request: cri.CreateContainerRequest, api: str
    ) -> cri.CreateContainerResponse:
        _require(request.pod_sandbox_id, "pod_sandbox_id")
        container_id = await self.containers.create(
            request.pod_sandbox_id, request.config, request.sandbox_config
        )
        return cri.CreateContainerResponse(container_id=container_id)

    async def start_container(
        self, request: cri.StartContainerRequest, api: str
    ) -> cri.StartContainerResponse:
        _require(request.container_id, "container_id")
        await self.containers.start(request.container_id)
        return cri.StartContainerResponse()

    async def stop_container(
        self, request: cri.StopContainerRequest, api: str
    ) -> cri.StopContainerResponse:
        _require(request.container_id, "container_id")
        await self.containers.stop(request.container_id, request.timeout)
        return cri.StopContainerResponse()

    async def remove_container(
        self, request: cri.RemoveContainerRequest, api: str
    ) -> cri.RemoveContainerResponse:
        _require(request.container_id, "container_id")
        await self.containers.remove(request.container_id)
        return cri.RemoveContainerResponse()

    async def list_containers(
        self, request: cri.ListContainersRequest, api: str
    ) -> cri.ListContainersResponse:
        records = self.ctx.metadata.containers()
        f = request.filter
        if f is not None:
            records = _select(records, f.id, f.label_selector, f.pod_sandbox_id)
            if f.state is not None:
                expected_state = cri.ContainerState(f.state.state).name
                records = [r for r in records if r.state == expected_state]
        records.sort(key=lambda r: r.created_at)
        return cri.ListContainersResponse(containers=[convert.container(r) for r in records])

    async def container_status(
        self, request: cri.ContainerStatusRequest, api: str
    ) -> cri.ContainerStatusResponse:
        record = self.containers.resolve(request.container_id)
        info = convert.container_info(record) if request.verbose else {}
        return cri.ContainerStatusResponse(status=convert.container_status(record), info=info)

    async def reopen_container_log(
        self, request: cri.ReopenContainerLogRequest, api: str
    ) -> cri.ReopenContainerLogResponse:
        _require(request.container_id, "container_id")
        record = self.containers.resolve(request.container_id)
        shim = self.containers.shims.get(record.id)
        if shim is None or not shim.running:
            # containerd rejects a reopen of a stopped container the same way.
            raise FailedPrecondition(
                f"container {record.id} is {record.state}: only a running container's log "
                "can be reopened"
            )
        shim.reopen_log()
        return cri.ReopenContainerLogResponse()

    async def exec_sync(self, request: cri.ExecSyncRequest, api: str) -> cri.ExecSyncResponse:
        _require(request.container_id, "container_id")
        result = await self.containers.exec_sync(
            request.container_id, list(request.cmd), request.timeout
        )
        return cri.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    # Streaming: each RPC validates, stores the request and returns a single-use URL.

    def _streaming_server(self) -> streaming.StreamingServer:
        if self.streaming is None:
            raise Unimplemented(f"streaming is not enabled in this {RUNTIME_NAME} daemon")
        return self.streaming

    async def exec(self, request: cri.ExecRequest, api: str) -> cri.ExecResponse:
        _require(request.container_id, "container_id")
        if not request.cmd:
            raise InvalidArgument("Exec needs cmd, the command to run")
        streaming.check_stdio("Exec", tty=request.tty, stdin=request.stdin,
                              stdout=request.stdout, stderr=request.stderr)
        record = self.containers.resolve(request.container_id)
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(
                f"container {record.id} is {record.state}: exec needs a running container"
            )
        url = self._streaming_server().url_for(streaming.ExecRequest(
            container_id=record.id,
            cmd=tuple(request.cmd),
            tty=request.tty,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            runtime=self.ctx.runtime(record.runtime_handler),
            work_dir=self.ctx.paths.container_state_dir(record.id) / "exec",
            socket_dir=self.ctx.paths.state / "consoles",
        ))
        return cri.ExecResponse(url=url)

    async def attach(self, request: cri.AttachRequest, api: str) -> cri.AttachResponse:
        _require(request.container_id, "container_id")
        streaming.check_stdio("Attach", tty=request.tty, stdin=request.stdin,
                              stdout=request.stdout, stderr=request.stderr)
        record = self.containers.resolve(request.container_id)
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(
                f"container {record.id} is {record.state}: attach needs a running container"
            )
        # TODO: attach needs the container output fanned out from its StreamPump and a stdin
        # FIFO from the create path. Until both exist it is rejected after validation.
        raise Unimplemented(f"Attach is not implemented by {RUNTIME_NAME}: use Exec")

    async def port_forward(
        self, request: cri.PortForwardRequest, api: str
    ) -> cri.PortForwardResponse:
        _require(request.pod_sandbox_id, "pod_sandbox_id")
        record = self.sandboxes.resolve(request.pod_sandbox_id)
        if record.state != SANDBOX_READY:
            raise FailedPrecondition(
                f"pod sandbox {record.id} is {record.state}: port forwarding needs a ready pod"
            )
        url = self._streaming_server().url_for(
            streaming.PortForwardRequest(sandbox_id=record.id, netns_path=record.netns_path)
        )
        return cri.PortForwardResponse(url=url)

    async def update_container_resources(
        self, request: cri.UpdateContainerResourcesRequest, api: str
    ) -> cri.UpdateContainerResourcesResponse:
        _require(request.container_id, "container_id")
        await self.containers.update_resources(request.container_id, request.linux)
        return cri.UpdateContainerResourcesResponse()

    # Statistics

    async def container_stats(
        self, request: cri.ContainerStatsRequest, api: str
    ) -> cri.ContainerStatsResponse:
        record = self.containers.resolve(request.container_id)
        return cri.ContainerStatsResponse(stats=await self.stats.container(record))

    async def list_container_stats(
        self, request: cri.ListContainerStatsRequest, api: str
    ) -> cri.ListContainerStatsResponse:
        records = [r for r in self.ctx.metadata.containers() if r.state == CONTAINER_RUNNING]
        f = request.filter
        if f is not None:
            records = _select(records, f.id, f.label_selector, f.pod_sandbox_id)
        return cri.ListContainerStatsResponse(
            stats=[await self.stats.container(r) for r in records]
        )

    async def pod_sandbox_stats(
        self, request: cri.PodSandboxStatsRequest, api: str
    ) -> cri.PodSandboxStatsResponse:
        record = self.sandboxes.resolve(request.pod_sandbox_id)
        return cri.PodSandboxStatsResponse(stats=await self.stats.sandbox(record))

    async def list_pod_sandbox_stats(
        self, request: cri.ListPodSandboxStatsRequest, api: str
    ) -> cri.ListPodSandboxStatsResponse:
        records = [r for r in self.ctx.metadata.sandboxes() if r.state == SANDBOX_READY]
        f = request.filter
        if f is not None:
            records = _select(records, f.id, f.label_selector)
        return cri.ListPodSandboxStatsResponse(
            stats=[await self.stats.sandbox(r) for r in records]
        )

    # Images

    async def pull_image(self, request: cri.PullImageRequest, api: str) -> cri.PullImageResponse:
        if request.image is None or not request.image.image:
            raise InvalidArgument("PullImage needs image.image, the reference to pull")
        auth = registry_auth(request.auth)
        image_id = await self.ctx.images.pull(request.image.image, auth)
        record = self.ctx.images.status(image_id)
        # kubelet records image_ref; containerd returns the image id there.
        return cri.PullImageResponse(image_ref=record.id if record else image_id)

    async def list_images(self, request: cri.ListImagesRequest, api: str) -> cri.ListImagesResponse:
        name = request.filter.image.image if request.filter and request.filter.image else None
        records = self.ctx.images.list(name or None)
        return cri.ListImagesResponse(images=[convert.image(r) for r in records])

    async def image_status(
        self, request: cri.ImageStatusRequest, api: str
    ) -> cri.ImageStatusResponse:
        if request.image is None or not request.image.image:
            raise InvalidArgument("ImageStatus needs image.image")
        record = self.ctx.images.status(request.image.image, strict=True)
        if record is None:
            # The CRI wants an empty status, not an error, for an image that is not present.
            return cri.ImageStatusResponse()
        info = {"info": _json(record.config)} if request.verbose else {}
        return cri.ImageStatusResponse(image=convert.image(record), info=info)

    async def remove_image(
        self, request: cri.RemoveImageRequest, api: str
    ) -> cri.RemoveImageResponse:
        if request.image is None or not request.image.image:
            raise InvalidArgument("RemoveImage needs image.image")
        await self.ctx.images.remove(request.image.image)
        return cri.RemoveImageResponse()

    async def image_fs_info(
        self, request: cri.ImageFsInfoRequest, api: str
    ) -> cri.ImageFsInfoResponse:
        usage = await self.ctx.images.fs_info()
        fs = cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=str(usage.mount_point)),
            used_bytes=cri.UInt64Value(value=usage.used_bytes),
            inodes_used=cri.UInt64Value(value=usage.inodes_used),
        )
        return cri.ImageFsInfoResponse(image_filesystems=[fs])


def registry_auth(auth: cri.AuthConfig | None) -> RegistryAuth | None:
    """Turn the CRI AuthConfig into registry credentials; None for an anonymous pull.

    A ready ``registry_token`` wins, then an ``identity_token`` (exchanged for an access token
    at the token realm), then username and password, then ``auth`` (base64 of user:password),
    as containerd orders them. ``server_address`` limits the credentials to that registry.
    """
    if auth is None:
        return None
    server = auth.server_address
    if auth.registry_token:
        return RegistryAuth(registry_token=auth.registry_token, server_address=server)
    if auth.identity_token:
        return RegistryAuth(
            username=auth.username, identity_token=auth.identity_token, server_address=server
        )
    if auth.username or auth.password:
        return RegistryAuth(username=auth.username, password=auth.password, server_address=server)
    if auth.auth:
        return RegistryAuth.from_encoded(auth.auth, server_address=server)
    return None


async def _receive(stream: Stream[Any, Any], method: str) -> Any:
    """Decode the request; a message that does not parse is the client's error, not ours."""
    try:
        return await stream.recv_message()
    except (UnicodeDecodeError, ValueError) as exc:
        # Protobuf strings must be UTF-8; betterproto2 rejects others while decoding.
        log.info("%s request rejected: cannot decode it: %s", method, exc)
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"{method}: invalid request: {exc}; string fields must be valid UTF-8",
        ) from exc


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is empty: the request must name the object")


def _labels_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


_Record = TypeVar("_Record", SandboxRecord, ContainerRecord)


def _select(
    records: list[_Record], id_prefix: str, selector: dict[str, str], sandbox_prefix: str = ""
) -> list[_Record]:
    """Keep the records whose id (and sandbox id) start with the prefixes and labels match."""
    return [
        r for r in records
        if r.id.startswith(id_prefix)
        and (not sandbox_prefix or getattr(r, "sandbox_id", "").startswith(sandbox_prefix))
        and _labels_match(r.labels, selector)
    ]


def _json(data: Any) -> str:
    return json.dumps(data)
