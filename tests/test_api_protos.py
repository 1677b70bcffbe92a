"""Tests for the CRI protobuf definitions and the betterproto2 modules generated from them.

The tests check that the committed servin_shim/api matches a fresh run of protos/generate.py and
that messages round-trip through bytes (maps, enums, nested messages, bytes fields, oneof). They
also cover server streaming and gRPC status codes over grpclib, and decoding runtime.v1alpha2
payloads as runtime.v1.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import betterproto2
import grpclib.client
import grpclib.server
import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from servin_shim.api.runtime import v1, v1alpha2

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATE_SCRIPT = REPO_ROOT / "protos" / "generate.py"
TEST_PROTO_ROOT = Path(__file__).resolve().parent / "protos"


def _load_generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("servin_protos_generate", GENERATE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_script = _load_generate_module()


def _tree_files(root: Path) -> dict[str, bytes]:
    """Map each file under root (relative path) to its contents, skipping __pycache__."""
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


# -- stale check -----------------------------------------------------------------------------


def test_generated_code_current(tmp_path: Path) -> None:
    fresh_dir = tmp_path / "api"
    fresh_dir.mkdir()
    generate_script.generate(fresh_dir)

    fresh = _tree_files(fresh_dir)
    committed = _tree_files(REPO_ROOT / "servin_shim" / "api")

    assert sorted(committed) == sorted(fresh), "run: .venv/bin/python protos/generate.py"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert stale == [], "run: .venv/bin/python protos/generate.py"


# -- round trips -----------------------------------------------------------------------------


def _sample_sandbox_config() -> v1.PodSandboxConfig:
    return v1.PodSandboxConfig(
        metadata=v1.PodSandboxMetadata(name="web", uid="7f3c", namespace="default", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/default_web_7f3c",
        dns_config=v1.DnsConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"]),
        port_mappings=[v1.PortMapping(protocol=v1.Protocol.UDP, container_port=53, host_port=0)],
        labels={"app": "web", "io.kubernetes.pod.name": "web"},
        annotations={"kubernetes.io/config.seen": "2024-05-01T10:00:00Z", "empty": ""},
        linux=v1.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/besteffort/pod7f3c",
            sysctls={"net.ipv4.ip_forward": "1"},
            security_context=v1.LinuxSandboxSecurityContext(
                namespace_options=v1.NamespaceOption(
                    network=v1.NamespaceMode.POD,
                    pid=v1.NamespaceMode.CONTAINER,
                    userns_options=v1.UserNamespace(
                        mode=v1.NamespaceMode.POD,
                        uids=[v1.IdMapping(host_id=100000, container_id=0, length=65536)],
                    ),
                ),
                run_as_user=v1.Int64Value(value=0),
                supplemental_groups=[1000, 2000],
                seccomp=v1.SecurityProfile(
                    profile_type=v1.SecurityProfileProfileType.Localhost,
                    localhost_ref="/var/lib/kubelet/seccomp/web.json",
                ),
            ),
        ),
    )


def test_sandbox_config_round_trip() -> None:
    original = _sample_sandbox_config()

    parsed = v1.PodSandboxConfig.parse(bytes(original))

    assert parsed == original
    assert parsed.labels == {"app": "web", "io.kubernetes.pod.name": "web"}
    assert parsed.annotations["empty"] == ""
    assert parsed.metadata is not None
    assert parsed.metadata.attempt == 2
    assert parsed.linux is not None
    assert parsed.linux.sysctls == {"net.ipv4.ip_forward": "1"}
    context = parsed.linux.security_context
    assert context is not None
    # Int64Value(0) must stay distinguishable from an unset run_as_user (root vs. image default).
    assert context.run_as_user == v1.Int64Value(value=0)
    assert context.run_as_group is None
    assert context.seccomp is not None
    assert context.seccomp.profile_type is v1.SecurityProfileProfileType.Localhost
    assert context.namespace_options is not None
    assert context.namespace_options.userns_options is not None
    assert context.namespace_options.userns_options.uids[0].host_id == 100000


def test_container_state_enum_round_trip() -> None:
    states = list(v1.ContainerState)
    response = v1.ListContainersResponse(
        containers=[v1.Container(id=f"c{i}", state=state) for i, state in enumerate(states)]
    )

    parsed = v1.ListContainersResponse.parse(bytes(response))

    assert [c.state for c in parsed.containers] == states
    assert all(isinstance(c.state, v1.ContainerState) for c in parsed.containers)


def test_enum_unknown_value_kept() -> None:
    # A newer kubelet may send enum values this build does not know, so parsing must keep them.
    raw = bytes(v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_RUNNING))
    raw = raw[:-1] + bytes([7])

    parsed = v1.ContainerStateValue.parse(raw)

    assert int(parsed.state) == 7
    assert bytes(parsed) == raw


def test_int64_timestamp_round_trip() -> None:
    nanoseconds = 1_714_557_600_123_456_789
    status = v1.ContainerStatus(
        id="c1", created_at=nanoseconds, started_at=nanoseconds + 1, exit_code=-1
    )

    parsed = v1.ContainerStatus.parse(bytes(status))

    assert parsed.created_at == nanoseconds
    assert isinstance(parsed.created_at, int)
    assert parsed.started_at == nanoseconds + 1
    assert parsed.finished_at == 0
    assert parsed.exit_code == -1


def test_bytes_field_round_trip() -> None:
    payload = bytes(range(256))
    response = v1.ExecSyncResponse(stdout=payload, stderr=b"", exit_code=3)

    parsed = v1.ExecSyncResponse.parse(bytes(response))

    assert parsed.stdout == payload
    assert isinstance(parsed.stdout, bytes)
    assert parsed.stderr == b""
    assert parsed.exit_code == 3


def test_unknown_fields_preserved() -> None:
    # A v1 field that v1alpha2 lacks (Container.image_id = 10) must pass through unchanged.
    newer = v1.Container(id="c1", image_id="sha256:abc")

    older = v1alpha2.Container.parse(bytes(newer))

    assert older.id == "c1"
    assert v1.Container.parse(bytes(older)).image_id == "sha256:abc"


# -- oneof (test-only proto, because CRI has no oneof) ---------------------------------------


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    package_dir = tmp_path / "servin_probe_gen"
    package_dir.mkdir()
    generate_script.generate(package_dir, TEST_PROTO_ROOT, ("oneof_probe.proto",))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("servin_probe_gen.servin.probe")
    finally:
        for name in [m for m in sys.modules if m.startswith("servin_probe_gen")]:
            del sys.modules[name]


def test_oneof_round_trip(probe_module: ModuleType) -> None:
    by_name = probe_module.PodSelector(
        pod_name=probe_module.PodName(namespace="default", name="web"), verbose=True
    )

    parsed = probe_module.PodSelector.parse(bytes(by_name))

    assert betterproto2.which_one_of(parsed, "target") == (
        "pod_name",
        probe_module.PodName(namespace="default", name="web"),
    )
    assert parsed.pod_sandbox_id is None
    assert parsed.verbose is True


def test_oneof_empty_member_set(probe_module: ModuleType) -> None:
    # A oneof member set to its default value is still "set" and must be sent on the wire.
    selector = probe_module.PodSelector(pod_sandbox_id="")

    parsed = probe_module.PodSelector.parse(bytes(selector))

    assert betterproto2.which_one_of(parsed, "target") == ("pod_sandbox_id", "")


@pytest.mark.xfail(
    strict=True,
    reason="betterproto2 0.10.0 keeps every oneof member it parses instead of the last one",
)
def test_oneof_last_member_wins(probe_module: ModuleType) -> None:
    first = bytes(probe_module.PodSelector(pod_sandbox_id="sb1"))
    second = bytes(probe_module.PodSelector(pod_name=probe_module.PodName(name="web")))

    parsed = probe_module.PodSelector.parse(first + second)

    assert parsed.pod_sandbox_id is None


# -- grpclib ---------------------------------------------------------------------------------


class _EventRuntime(v1.RuntimeServiceBase):
    """RuntimeService that streams three container events and rejects RunPodSandbox."""

    async def get_container_events(
        self, message: v1.GetEventsRequest
    ) -> AsyncIterator[v1.ContainerEventResponse]:
        kinds = [
            v1.ContainerEventType.CONTAINER_CREATED_EVENT,
            v1.ContainerEventType.CONTAINER_STARTED_EVENT,
            v1.ContainerEventType.CONTAINER_STOPPED_EVENT,
        ]
        for index, kind in enumerate(kinds):
            yield v1.ContainerEventResponse(
                container_id="c1",
                container_event_type=kind,
                created_at=1_000 + index,
                containers_statuses=[v1.ContainerStatus(id="c1")],
            )

    async def run_pod_sandbox(self, message: v1.RunPodSandboxRequest) -> v1.RunPodSandboxResponse:
        raise GRPCError(Status.INVALID_ARGUMENT, f"runtime handler {message.runtime_handler!r}")


async def test_server_accepts_bases(tmp_path: Path) -> None:
    # betterproto2's ServiceBase does not declare grpclib's IServable protocol, hence Any.
    services: list[Any] = [
        v1.RuntimeServiceBase(),
        v1.ImageServiceBase(),
        v1alpha2.RuntimeServiceBase(),
        v1alpha2.ImageServiceBase(),
    ]
    socket_path = str(tmp_path / "cri.sock")
    server = grpclib.server.Server(services)
    await server.start(path=socket_path)
    channel = grpclib.client.Channel(path=socket_path)
    try:
        with pytest.raises(GRPCError) as raised:
            await v1alpha2.ImageServiceStub(channel).image_fs_info(v1alpha2.ImageFsInfoRequest())
    finally:
        channel.close()
        server.close()
        await server.wait_closed()

    assert raised.value.status is Status.UNIMPLEMENTED
    assert "/runtime.v1.RuntimeService/GetContainerEvents" in services[0].__mapping__()


async def test_container_events_stream() -> None:
    async with ChannelFor([_EventRuntime()]) as channel:
        stub = v1.RuntimeServiceStub(channel)
        events = [event async for event in stub.get_container_events(v1.GetEventsRequest())]

    assert len(events) == 3
    assert [event.created_at for event in events] == [1_000, 1_001, 1_002]
    assert events[2].container_event_type is v1.ContainerEventType.CONTAINER_STOPPED_EVENT
    assert events[0].containers_statuses[0].id == "c1"


async def test_handler_grpc_status() -> None:
    async with ChannelFor([_EventRuntime()]) as channel:
        stub = v1.RuntimeServiceStub(channel)
        with pytest.raises(GRPCError) as raised:
            await stub.run_pod_sandbox(v1.RunPodSandboxRequest(runtime_handler="kata"))

    assert raised.value.status is Status.INVALID_ARGUMENT
    assert raised.value.message == "runtime handler 'kata'"


async def test_unimplemented_default() -> None:
    async with ChannelFor([_EventRuntime()]) as channel:
        stub = v1.RuntimeServiceStub(channel)
        with pytest.raises(GRPCError) as raised:
            await stub.version(v1.VersionRequest(version="v1"))

    assert raised.value.status is Status.UNIMPLEMENTED


# -- v1alpha2 payloads decoded as v1 ---------------------------------------------------------


def _alpha_sandbox_config() -> v1alpha2.PodSandboxConfig:
    return v1alpha2.PodSandboxConfig(
        metadata=v1alpha2.PodSandboxMetadata(name="web", uid="7f3c", namespace="default"),
        hostname="web-0",
        log_directory="/var/log/pods/default_web_7f3c",
        port_mappings=[v1alpha2.PortMapping(container_port=80, host_port=8080, host_ip="0.0.0.0")],
        labels={"app": "web"},
        annotations={"a": "1"},
        linux=v1alpha2.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod7f3c",
            security_context=v1alpha2.LinuxSandboxSecurityContext(
                namespace_options=v1alpha2.NamespaceOption(network=v1alpha2.NamespaceMode.NODE),
                run_as_user=v1alpha2.Int64Value(value=1000),
                run_as_group=v1alpha2.Int64Value(value=1000),
                privileged=True,
            ),
            overhead=v1alpha2.LinuxContainerResources(memory_limit_in_bytes=1 << 20),
        ),
        windows=v1alpha2.WindowsPodSandboxConfig(
            security_context=v1alpha2.WindowsSandboxSecurityContext(run_as_username="admin")
        ),
    )


def _alpha_container_config() -> v1alpha2.ContainerConfig:
    return v1alpha2.ContainerConfig(
        metadata=v1alpha2.ContainerMetadata(name="app", attempt=1),
        image=v1alpha2.ImageSpec(image="registry.local/app:1", annotations={"os": "linux"}),
        command=["/bin/sh"],
        args=["-c", "sleep 1"],
        working_dir="/srv",
        envs=[v1alpha2.KeyValue(key="A", value="1"), v1alpha2.KeyValue(key="B", value="")],
        mounts=[
            v1alpha2.Mount(
                container_path="/data",
                host_path="/var/lib/data",
                readonly=True,
                propagation=v1alpha2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            )
        ],
        devices=[
            v1alpha2.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rwm")
        ],
        labels={"tier": "backend"},
        annotations={"k": "v"},
        log_path="app/1.log",
        stdin=True,
        tty=True,
        linux=v1alpha2.LinuxContainerConfig(
            resources=v1alpha2.LinuxContainerResources(
                cpu_period=100_000,
                cpu_quota=50_000,
                cpu_shares=512,
                memory_limit_in_bytes=256 << 20,
                oom_score_adj=-997,
                cpuset_cpus="0-1",
                hugepage_limits=[v1alpha2.HugepageLimit(page_size="2MB", limit=1 << 22)],
                unified={"memory.high": "200000000"},
                memory_swap_limit_in_bytes=512 << 20,
            ),
            security_context=v1alpha2.LinuxContainerSecurityContext(
                capabilities=v1alpha2.Capability(
                    add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]
                ),
                run_as_username="app",
                readonly_rootfs=True,
                no_new_privs=True,
                masked_paths=["/proc/kcore"],
                readonly_paths=["/proc/sys"],
                seccomp=v1alpha2.SecurityProfile(
                    profile_type=v1alpha2.SecurityProfileProfileType.RuntimeDefault
                ),
            ),
        ),
    )


def _alpha_samples() -> list[betterproto2.Message]:
    return [
        v1alpha2.RunPodSandboxRequest(config=_alpha_sandbox_config(), runtime_handler="runc"),
        v1alpha2.CreateContainerRequest(
            pod_sandbox_id="sb1",
            config=_alpha_container_config(),
            sandbox_config=_alpha_sandbox_config(),
        ),
        v1alpha2.ListContainersResponse(
            containers=[
                v1alpha2.Container(
                    id=f"c{i}",
                    pod_sandbox_id="sb1",
                    metadata=v1alpha2.ContainerMetadata(name=f"app{i}"),
                    image=v1alpha2.ImageSpec(image="registry.local/app:1"),
                    image_ref="sha256:" + "a" * 64,
                    state=state,
                    created_at=1_714_557_600_000_000_000 + i,
                    labels={"i": str(i)},
                )
                for i, state in enumerate(v1alpha2.ContainerState)
            ]
        ),
        v1alpha2.ImageStatusResponse(
            image=v1alpha2.Image(
                id="sha256:" + "b" * 64,
                repo_tags=["registry.local/app:1"],
                repo_digests=["registry.local/app@sha256:" + "c" * 64],
                size=12_345_678,
                uid=v1alpha2.Int64Value(value=0),
                spec=v1alpha2.ImageSpec(image="registry.local/app:1"),
                pinned=True,
            ),
            info={"info": '{"chainID": "x"}'},
        ),
    ]


@pytest.mark.parametrize("alpha", _alpha_samples(), ids=lambda m: type(m).__name__)
def test_alpha_decodes_as_v1(alpha: betterproto2.Message) -> None:
    v1_class = getattr(v1, type(alpha).__name__)
    wire = bytes(alpha)

    as_v1 = v1_class.parse(wire)

    assert as_v1.to_dict() == alpha.to_dict()
    assert as_v1._unknown_fields == b""
    # The v1 class re-encodes to the same bytes, so v1 responses read fine in v1alpha2 clients.
    assert bytes(as_v1) == wire


def test_alpha_nested_field_read() -> None:
    request = v1alpha2.CreateContainerRequest(config=_alpha_container_config())

    as_v1 = v1.CreateContainerRequest.parse(bytes(request))

    assert as_v1.config is not None
    assert as_v1.config.linux is not None
    resources = as_v1.config.linux.resources
    assert resources is not None
    assert resources.hugepage_limits == [v1.HugepageLimit(page_size="2MB", limit=1 << 22)]
    assert resources.oom_score_adj == -997


# -- descriptor comparison: v1alpha2 must be a wire-compatible subset of v1 ------------------


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "cri.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT / 'protos'}",
            f"--descriptor_set_out={out}",
            *generate_script.PROTO_FILES,
        ],
        check=True,
        capture_output=True,
    )
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString(out.read_bytes())
    return files


def _index(
    file: descriptor_pb2.FileDescriptorProto,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Index messages, enums and rpcs by name relative to the package (nested as A.B)."""
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}

    def visit(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = prefix + message.name
        messages[name] = message
        for enum in message.enum_type:
            enums[f"{name}.{enum.name}"] = enum
        for nested in message.nested_type:
            visit(nested, name + ".")

    for message in file.message_type:
        visit(message, "")
    for enum in file.enum_type:
        enums[enum.name] = enum
    rpcs = {f"{s.name}/{m.name}": m for s in file.service for m in s.method}
    return messages, enums, rpcs


def _strip_package(type_name: str, package: str) -> str:
    return type_name.removeprefix(f".{package}.")


def _compare_fields(
    name: str,
    alpha: descriptor_pb2.DescriptorProto,
    stable: descriptor_pb2.DescriptorProto,
) -> list[str]:
    differences: list[str] = []
    stable_fields = {f.number: f for f in stable.field}
    for field in alpha.field:
        other = stable_fields.get(field.number)
        if other is None:
            differences.append(f"{name}.{field.name}={field.number} missing in v1")
            continue
        alpha_shape = (
            field.name,
            field.type,
            field.label,
            _strip_package(field.type_name, "runtime.v1alpha2"),
        )
        stable_shape = (
            other.name,
            other.type,
            other.label,
            _strip_package(other.type_name, "runtime.v1"),
        )
        if alpha_shape != stable_shape:
            differences.append(f"{name} field {field.number}: {alpha_shape} != {stable_shape}")
    return differences


def test_alpha_subset_of_v1(tmp_path: Path) -> None:
    by_package = {f.package: f for f in _descriptor_set(tmp_path).file}
    alpha_messages, alpha_enums, alpha_rpcs = _index(by_package["runtime.v1alpha2"])
    v1_messages, v1_enums, v1_rpcs = _index(by_package["runtime.v1"])
    differences: list[str] = []

    for name, message in alpha_messages.items():
        if name not in v1_messages:
            differences.append(f"message {name} missing in v1")
            continue
        differences += _compare_fields(name, message, v1_messages[name])

    for name, enum in alpha_enums.items():
        v1_values = {v.number: v.name for v in v1_enums.get(name, enum).value}
        if name not in v1_enums:
            differences.append(f"enum {name} missing in v1")
        for value in enum.value:
            if v1_values.get(value.number) != value.name:
                differences.append(f"enum {name} value {value.number}: {value.name}")

    for name, rpc in alpha_rpcs.items():
        other = v1_rpcs.get(name)
        alpha_shape = (
            _strip_package(rpc.input_type, "runtime.v1alpha2"),
            _strip_package(rpc.output_type, "runtime.v1alpha2"),
            rpc.server_streaming,
        )
        if other is None:
            differences.append(f"rpc {name} missing in v1")
            continue
        stable_shape = (
            _strip_package(other.input_type, "runtime.v1"),
            _strip_package(other.output_type, "runtime.v1"),
            other.server_streaming,
        )
        if alpha_shape != stable_shape:
            differences.append(f"rpc {name}: {alpha_shape} != {stable_shape}")

    log.info(
        "compared messages=%d enums=%d rpcs=%d",
        len(alpha_messages),
        len(alpha_enums),
        len(alpha_rpcs),
    )
    assert differences == []
    assert len(alpha_messages) > 100
