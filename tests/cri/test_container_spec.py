"""Unit tests of the container config.json: args, env, users, security, resources and mounts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from servin_shim.api.runtime import v1 as cri
from servin_shim.config.models import Spec
from servin_shim.cri.container_spec import (
    build_container_spec,
    check_propagation,
    container_env,
    ensure_workdir,
    kubelet_args,
    working_dir,
)
from servin_shim.cri.context import Paths
from servin_shim.errors import FailedPrecondition, InvalidArgument
from servin_shim.oci import resources, seccomp, security
from servin_shim.oci.spec import MountInfo, resolve_in_root
from servin_shim.oci.users import resolve_user
from servin_shim.state.records import ContainerRecord, Mount, SandboxRecord

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nvideo:x:44:app\naudio:x:63:other\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    return rootfs


def sandbox(privileged: bool = False, **modes: str) -> SandboxRecord:
    config = cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(privileged=privileged)))
    return SandboxRecord(
        id="s1", name="pod", namespace="ns", uid="u", infra_pid=42, netns_path="/run/netns/x",
        namespace_modes={"network": "POD", "pid": "CONTAINER", "ipc": "POD", **modes},
        config_b64=base64.b64encode(bytes(config)).decode(),
    )


def build(root: Path, config: cri.ContainerConfig, image: dict | None = None,
          pod: SandboxRecord | None = None, settings: Spec | None = None,
          mounts: list[Mount] | None = None) -> dict:
    record = ContainerRecord(id="c1", sandbox_id="s1", name="c", mounts=mounts or [])
    paths = Paths(root=root.parent / "r", state=root.parent / "s")
    image = image if image is not None else {"Cmd": ["sh"]}
    return build_container_spec(paths, record, pod or sandbox(), config, image, root,
                                 settings=settings)


def linux(**fields: object) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**fields))  # type: ignore[arg-type]


# Process arguments, env and working directory

@pytest.mark.parametrize(("command", "args", "entrypoint", "cmd", "expected"), [
    ([], [], ["ep"], ["c"], ["ep", "c"]),
    ([], ["a"], ["ep"], ["c"], ["ep", "a"]),
    (["x"], [], ["ep"], ["c"], ["x"]),
    (["x"], ["a"], ["ep"], ["c"], ["x", "a"]),
    ([], ["a"], [], ["c"], ["a"]),
    ([], [], [], ["c"], ["c"]),
])
def test_kubelet_args_table(command: list[str], args: list[str], entrypoint: list[str],
                            cmd: list[str], expected: list[str]) -> None:
    assert kubelet_args(command, args, entrypoint, cmd) == expected


def test_spec_without_command_rejected(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        build(root, cri.ContainerConfig(), image={})


def test_env_overrides_image_in_order() -> None:
    env = container_env(["A=1", "BARE", "B=x=y"],
                        [cri.KeyValue(key="A", value="2"), cri.KeyValue(key="C", value="a=b")])
    assert env[0].startswith("PATH=")
    assert env[1:] == ["A=2", "B=x=y", "C=a=b"]


def test_env_keeps_image_path() -> None:
    env = container_env(["PATH=/opt"], [])
    assert env == ["PATH=/opt"]


def test_env_empty_name_rejected() -> None:
    with pytest.raises(InvalidArgument):
        container_env([], [cri.KeyValue(key="", value="v")])


def test_working_dir_fallbacks() -> None:
    assert working_dir("/req", "/img") == "/req"
    assert working_dir("", "/img") == "/img"
    assert working_dir("", "rel/dir") == "/rel/dir"
    assert working_dir("", "") == "/"


def test_working_dir_relative_rejected() -> None:
    with pytest.raises(InvalidArgument):
        working_dir("rel", "")


def test_spec_tty_and_stdin(root: Path) -> None:
    spec = build(root, cri.ContainerConfig(tty=True, stdin=True, stdin_once=True))
    assert spec["process"]["terminal"] is True
    assert spec["annotations"]["io.servin.container.stdin"] == "true"
    assert spec["annotations"]["io.servin.container.stdin-once"] == "true"


def test_ensure_workdir_owned_by_user(root: Path) -> None:
    ensure_workdir(root, "/data/app", 1000, 1000)
    created = root / "data" / "app"
    assert created.is_dir()
    assert created.stat().st_uid == 1000
    assert (root / "data").stat().st_gid == 1000


def test_ensure_workdir_stays_in_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(str(outside))
    ensure_workdir(root, "/link/w", 0, 0)
    assert not (outside / "w").exists()
    assert (root / str(outside).lstrip("/") / "w").is_dir()


def test_resolve_in_root_dotdot(root: Path) -> None:
    assert resolve_in_root(root, "/../../etc/passwd") == root / "etc" / "passwd"


# Users

@pytest.mark.parametrize(("user", "uid", "gid", "groups"), [
    ("", 0, 0, [0]),
    ("app", 1000, 1000, [1000, 44]),
    ("1000", 1000, 1000, [1000, 44]),
    ("1000:0", 1000, 0, [0, 44]),
    ("app:video", 1000, 44, [44]),
    ("4242", 4242, 0, [0]),
    ("4242:audio", 4242, 63, [63]),
])
def test_resolve_user_forms(root: Path, user: str, uid: int, gid: int,
                            groups: list[int]) -> None:
    resolved = resolve_user(root, user)
    assert resolved.uid == uid
    assert resolved.gid == gid
    assert resolved.additional_gids == groups


def test_resolve_user_overrides(root: Path) -> None:
    resolved = resolve_user(root, "app", run_as_user=0, run_as_group=5, supplemental_groups=[7])
    assert (resolved.uid, resolved.gid) == (0, 5)
    assert resolved.additional_gids == [5, 7]


def test_resolve_username_override(root: Path) -> None:
    resolved = resolve_user(root, "", run_as_username="app")
    assert resolved.uid == 1000
    assert resolved.home == "/home/app"


def test_resolve_user_strict_groups(root: Path) -> None:
    resolved = resolve_user(root, "app", supplemental_groups=[9], strict_groups=True)
    assert resolved.additional_gids == [1000, 9]


def test_resolve_unknown_user_rejected(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="'ghost'"):
        resolve_user(root, "ghost")


def test_resolve_unknown_group_rejected(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="'ghosts'"):
        resolve_user(root, "app:ghosts")


def test_resolve_user_ignores_host_passwd(root: Path) -> None:
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument):
        resolve_user(root, "root")


def test_resolve_user_negative_uid_rejected(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="run_as_user"):
        resolve_user(root, "", run_as_user=-1)


def test_spec_home_from_passwd(root: Path) -> None:
    spec = build(root, cri.ContainerConfig(), image={"Cmd": ["sh"], "User": "app"})
    assert "HOME=/home/app" in spec["process"]["env"]
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 44]}


def test_spec_default_user_from_config(root: Path) -> None:
    settings = Spec.model_validate({"securityContext": {"runAsUser": 1000}})
    assert build(root, cri.ContainerConfig(), settings=settings)["process"]["user"]["uid"] == 1000
    image = {"Cmd": ["sh"], "User": "0"}
    assert build(root, cri.ContainerConfig(), image, settings=settings)["process"]["user"]["uid"] == 0


# Capabilities and privileged mode

def test_capabilities_default() -> None:
    assert security.capabilities([], []) == security.ocispec.DEFAULT_CAPABILITIES


def test_capabilities_drop_all_add_one() -> None:
    assert security.capabilities(["net_admin"], ["ALL"]) == ["CAP_NET_ADMIN"]


def test_capabilities_add_all_drop_one() -> None:
    caps = security.capabilities(["ALL"], ["CAP_SYS_ADMIN"])
    assert "CAP_SYS_ADMIN" not in caps
    assert "CAP_SYS_PTRACE" in caps


def test_capabilities_unknown_rejected() -> None:
    with pytest.raises(InvalidArgument, match="CAP_FLY"):
        security.capabilities(["CAP_FLY"], [])


def test_spec_privileged(root: Path) -> None:
    spec = build(root, cri.ContainerConfig(linux=linux(privileged=True)),
                 pod=sandbox(privileged=True))
    assert spec["process"]["capabilities"]["effective"] == security.all_capabilities()
    assert spec["linux"]["maskedPaths"] == []
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert any(d["path"] == "/dev/null" for d in spec["linux"]["devices"])
    sysfs = next(m for m in spec["mounts"] if m["type"] == "sysfs")
    assert "ro" not in sysfs["options"]
    assert "seccomp" not in spec["linux"]


def test_spec_privileged_needs_privileged_pod(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="sandbox"):
        build(root, cri.ContainerConfig(linux=linux(privileged=True)))


def test_spec_readonly_and_no_new_privs(root: Path) -> None:
    spec = build(root, cri.ContainerConfig(linux=linux(readonly_rootfs=True, no_new_privs=True)))
    assert spec["root"]["readonly"] is True
    assert spec["process"]["noNewPrivileges"] is True


def test_spec_masked_paths_from_request(root: Path) -> None:
    config = cri.ContainerConfig(linux=linux(masked_paths=["/proc/x"], readonly_paths=["/y"]))
    spec = build(root, config)
    assert spec["linux"]["maskedPaths"] == ["/proc/x"]
    assert spec["linux"]["readonlyPaths"] == ["/y"]


def test_spec_masked_paths_default(root: Path) -> None:
    spec = build(root, cri.ContainerConfig())
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]


def test_spec_device_permissions(root: Path) -> None:
    device = cri.Device(host_path="/dev/zero", container_path="/dev/z", permissions="r")
    spec = build(root, cri.ContainerConfig(devices=[device]))
    entry = spec["linux"]["devices"][0]
    assert (entry["path"], entry["type"], entry["major"], entry["minor"]) == ("/dev/z", "c", 1, 5)
    assert spec["linux"]["resources"]["devices"][-1] == {
        "allow": True, "type": "c", "major": 1, "minor": 5, "access": "r"}


def test_spec_device_bad_permissions(root: Path) -> None:
    device = cri.Device(host_path="/dev/zero", container_path="/dev/z", permissions="rx")
    with pytest.raises(InvalidArgument, match="'rx'"):
        build(root, cri.ContainerConfig(devices=[device]))


def test_spec_device_not_a_device(root: Path) -> None:
    device = cri.Device(host_path="/etc/hostname", container_path="/dev/h")
    with pytest.raises(InvalidArgument, match="/etc/hostname"):
        build(root, cri.ContainerConfig(devices=[device]))


# Seccomp and LSMs

def rule_names(profile: dict) -> set[str]:
    return {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
            and "args" not in rule for name in rule["names"]}


def test_seccomp_default_applied(root: Path) -> None:
    profile = build(root, cri.ContainerConfig())["linux"]["seccomp"]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "read" in rule_names(profile)
    assert "unshare" not in rule_names(profile)
    assert "keyctl" not in rule_names(profile)


def test_seccomp_default_follows_capabilities() -> None:
    profile = seccomp.default_profile(["CAP_SYS_ADMIN"], machine="x86_64")
    assert "unshare" in rule_names(profile)
    assert profile["architectures"][0] == "SCMP_ARCH_X86_64"
    assert all("requiresCapabilities" not in rule for rule in profile["syscalls"])


def test_seccomp_unconfined(root: Path) -> None:
    config = cri.ContainerConfig(linux=linux(seccomp=cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Unconfined)))
    assert "seccomp" not in build(root, config)["linux"]


def test_seccomp_disabled_by_config(root: Path) -> None:
    settings = Spec.model_validate({"security": {"seccomp": False}})
    assert "seccomp" not in build(root, cri.ContainerConfig(), settings=settings)["linux"]


def test_seccomp_localhost(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"name": "mkdir", "action": "SCMP_ACT_ERRNO"},
                     {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
                      "includes": {"caps": ["CAP_SYS_ADMIN"]}}],
    }))
    config = cri.ContainerConfig(linux=linux(seccomp=cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref=str(path))))
    profile = build(root, config)["linux"]["seccomp"]
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["syscalls"] == [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]


@pytest.mark.filterwarnings("ignore:.*seccomp_profile_path is deprecated")
def test_seccomp_localhost_missing(root: Path) -> None:
    config = cri.ContainerConfig(linux=linux(seccomp_profile_path="localhost//nope.json"))
    with pytest.raises(InvalidArgument, match="/nope.json"):
        build(root, config)


@pytest.mark.filterwarnings("ignore:.*seccomp_profile_path is deprecated")
def test_seccomp_bad_path_form(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="'other'"):
        build(root, cri.ContainerConfig(linux=linux(seccomp_profile_path="other")))


def test_apparmor_skipped_without_host_support(root: Path) -> None:
    settings = Spec.model_validate({"security": {"apparmor": True, "selinux": True}})
    config = cri.ContainerConfig(linux=linux(
        apparmor=cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.Localhost,
                                     localhost_ref="localhost/custom"),
        selinux_options=cri.SeLinuxOption(type="spc_t")))
    spec = build(root, config, settings=settings)
    assert security.apparmor_enabled() is False
    assert "apparmorProfile" not in spec["process"]
    assert "selinuxLabel" not in spec["process"]


def test_apparmor_profile_when_enabled(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This node has no AppArmor, so the host check is the one part replaced here.
    monkeypatch.setattr(security, "apparmor_enabled", lambda: True)
    settings = Spec.model_validate({"security": {"apparmor": True}})
    config = cri.ContainerConfig(linux=linux(apparmor=cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref="localhost/web")))
    assert build(root, config, settings=settings)["process"]["apparmorProfile"] == "web"


# Resources

def test_resources_cpu_memory() -> None:
    request = cri.LinuxContainerResources(
        cpu_quota=50_000, cpu_shares=512, cpuset_cpus="0", cpuset_mems="0",
        memory_limit_in_bytes=64 << 20, oom_score_adj=300)
    limits, oom = resources.linux_resources(request, Spec().resources, container_id="c")
    assert limits["cpu"] == {"quota": 50_000, "period": 100_000, "shares": 512, "cpus": "0",
                             "mems": "0"}
    assert limits["memory"] == {"limit": 64 << 20, "swap": 64 << 20}
    assert oom == 300


def test_resources_swap_below_limit_rejected() -> None:
    request = cri.LinuxContainerResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=50)
    with pytest.raises(InvalidArgument, match="50"):
        resources.linux_resources(request, Spec().resources, container_id="c")


def test_resources_config_defaults() -> None:
    config = Spec.model_validate({"resources": {
        "cpuCfsPeriod": "50ms", "cpuCfsQuota": "25ms", "oomScoreAdj": 10}}).resources
    limits, oom = resources.linux_resources(None, config, container_id="c")
    assert limits["cpu"] == {"quota": 25_000, "period": 50_000}
    assert oom == 10


def test_resources_oom_clamped_to_daemon() -> None:
    own = resources.daemon_oom_score_adj()
    request = cri.LinuxContainerResources(oom_score_adj=-1000)
    _, oom = resources.linux_resources(request, Spec().resources, container_id="c")
    assert oom == own


def test_resources_unified_needs_v2() -> None:
    request = cri.LinuxContainerResources(unified={"memory.high": "1000000"})
    if resources.cgroup_v2_unified():
        pytest.skip("this node runs cgroup v2, where unified settings are valid")
    with pytest.raises(InvalidArgument, match="memory.high"):
        resources.linux_resources(request, Spec().resources, container_id="c")


def test_resources_bad_hugepage_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # No hugetlb v1 hierarchy on this node, so the availability check is replaced here.
    monkeypatch.setattr(resources, "hugetlb_available", lambda: True)
    request = cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size="3MB", limit=1)])
    with pytest.raises(InvalidArgument, match="3MB"):
        resources.linux_resources(request, Spec().resources, container_id="c")


def test_resources_hugepages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "hugetlb_available", lambda: True)
    monkeypatch.setattr(resources, "supported_page_sizes", lambda: {"2MB", "1GB"})
    request = cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 20)])
    limits, _ = resources.linux_resources(request, Spec().resources, container_id="c")
    assert limits["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]


@pytest.mark.parametrize(("parent", "expected"), [
    ("", "/servin/c1"),
    ("/kubepods/pod1", "/kubepods/pod1/c1"),
    ("kubepods/", "/kubepods/c1"),
    ("kubepods-burstable-pod1.slice", "kubepods-burstable-pod1.slice:servin:c1"),
])
def test_cgroups_path(parent: str, expected: str) -> None:
    assert resources.cgroups_path(parent, "c1") == expected


def test_spec_cgroups_path_under_pod(root: Path) -> None:
    assert build(root, cri.ContainerConfig())["linux"]["cgroupsPath"] == "/servin/s1/c1"


# Mounts and namespaces

def test_propagation_rshared_needs_shared(tmp_path: Path) -> None:
    mounts = [MountInfo("/", []), MountInfo(str(tmp_path), ["master:3"])]
    with pytest.raises(FailedPrecondition, match=str(tmp_path)):
        check_propagation(tmp_path, "rshared", mounts)
    check_propagation(tmp_path, "rslave", mounts)


def test_propagation_rslave_needs_shared_or_slave(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="neither a shared"):
        check_propagation(tmp_path, "rslave", [MountInfo("/", [])])
    check_propagation(tmp_path, "rslave", [MountInfo("/", ["shared:1"])])


def test_spec_mount_options(root: Path, tmp_path: Path) -> None:
    mount = Mount(container_path="/data", host_path=str(tmp_path / "vol"), readonly=True)
    spec = build(root, cri.ContainerConfig(), mounts=[mount])
    entry = next(m for m in spec["mounts"] if m["destination"] == "/data")
    assert entry["options"] == ["rbind", "rprivate", "ro"]
    assert (tmp_path / "vol").is_dir()


def test_spec_joins_pod_namespaces(root: Path) -> None:
    namespaces = {ns["type"]: ns.get("path") for ns in
                  build(root, cri.ContainerConfig())["linux"]["namespaces"]}
    assert namespaces["network"] == "/run/netns/x"
    assert namespaces["ipc"] == "/proc/42/ns/ipc"
    assert namespaces["uts"] == "/proc/42/ns/uts"
    assert namespaces["pid"] is None


def test_spec_host_namespaces(root: Path) -> None:
    pod = sandbox(network="NODE", pid="NODE", ipc="NODE")
    spec = build(root, cri.ContainerConfig(), pod=pod)
    assert [ns["type"] for ns in spec["linux"]["namespaces"]] == ["mount"]
    shm = next(m for m in spec["mounts"] if m["destination"] == "/dev/shm")
    assert shm["source"] == "/dev/shm"


def test_spec_target_pid_namespace(root: Path) -> None:
    options = cri.NamespaceOption(pid=cri.NamespaceMode.TARGET, target_id="t1")
    record = ContainerRecord(id="c1", sandbox_id="s1", name="c")
    paths = Paths(root=root.parent / "r", state=root.parent / "s")
    spec = build_container_spec(paths, record, sandbox(), cri.ContainerConfig(
        linux=linux(namespace_options=options)), {"Cmd": ["sh"]}, root,
        target_pid=lambda target: {"t1": 77}[target])
    pid = next(ns for ns in spec["linux"]["namespaces"] if ns["type"] == "pid")
    assert pid["path"] == "/proc/77/ns/pid"


# Pod sysctls

def test_sysctls_namespaced_accepted() -> None:
    modes = {"network": "POD", "ipc": "POD"}
    sysctls = {"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1", "kernel.sem": "1 2 3 4",
               "fs.mqueue.msg_max": "20", "net/ipv4/conf/eth0.1/forwarding": "1"}
    out = security.pod_sysctls(sysctls, modes)
    assert out["net.ipv4.conf.eth0/1.forwarding"] == "1"
    assert out["kernel.sem"] == "1 2 3 4"


def test_sysctls_host_network_rejected() -> None:
    with pytest.raises(InvalidArgument, match="host network"):
        security.pod_sysctls({"net.ipv4.ip_forward": "1"}, {"network": "NODE", "ipc": "POD"})


def test_sysctls_host_ipc_rejected() -> None:
    with pytest.raises(InvalidArgument, match="host IPC"):
        security.pod_sysctls({"kernel.msgmax": "1"}, {"network": "POD", "ipc": "NODE"})


def test_sysctls_not_namespaced_rejected() -> None:
    with pytest.raises(InvalidArgument, match="vm.swappiness"):
        security.pod_sysctls({"vm.swappiness": "1"}, {"network": "POD", "ipc": "POD"})
