"""The OCI config.json of a container, built from the image config and the CRI ContainerConfig.

Process arguments follow kubelet's rule, the user resolves against the image's own files, and
the container joins its pod's namespaces and shared /etc files.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.cri.context import Paths
from servin_shim.errors import InvalidArgument
from servin_shim.oci import spec as ocispec
from servin_shim.oci.users import resolve_user
from servin_shim.state.records import ContainerRecord, SandboxRecord

PROPAGATION_OPTIONS = {
    cri.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def kubelet_args(
    command: list[str], args: list[str], entrypoint: list[str], cmd: list[str]
) -> list[str]:
    """Combine the CRI command and args with the image, by kubelet's rule.

    ``command`` replaces the image Entrypoint (and drops its Cmd), ``args`` replace the Cmd,
    and ``args`` alone run after the image Entrypoint.
    """
    if command:
        return list(command) + list(args)
    return list(entrypoint) + (list(args) if args else list(cmd))


def parse_signal(name: str) -> int:
    """Turn an image StopSignal (``SIGINT``, ``INT`` or ``2``) into a number; SIGTERM if empty."""
    if not name:
        return signal.SIGTERM
    if name.isdigit():
        return int(name)
    upper = name.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    try:
        return int(signal.Signals[upper])
    except KeyError:
        raise InvalidArgument(f"invalid stop signal {name!r} in the image config") from None



def build_container_spec(
    paths: Paths, record: ContainerRecord, sandbox: SandboxRecord, config: cri.ContainerConfig,
    image_config: dict[str, Any], root: Path,
) -> dict[str, Any]:
    args = kubelet_args(
        list(config.command), list(config.args),
        list(image_config.get("Entrypoint") or []), list(image_config.get("Cmd") or []),
    )
    if not args:
        raise InvalidArgument(
            f"container {record.name!r} has no command: the image sets no Entrypoint or Cmd "
            "and the request sets no command or args"
        )
    spec = ocispec.base_spec(root=root, args=args)
    process = spec["process"]
    process["env"] = ocispec.merge_env(
        ocispec.image_env(image_config.get("Env")),
        [(kv.key, kv.value) for kv in config.envs],
    )
    process["cwd"] = config.working_dir or image_config.get("WorkingDir") or "/"
    process["terminal"] = bool(config.tty)

    security = config.linux.security_context if config.linux else None
    user = resolve_user(
        root,
        str(image_config.get("User") or ""),
        run_as_user=security.run_as_user.value if security and security.run_as_user else None,
        run_as_username=security.run_as_username if security else "",
        run_as_group=security.run_as_group.value if security and security.run_as_group else None,
        supplemental_groups=list(security.supplemental_groups) if security else [],
    )
    process["user"] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        process["user"]["additionalGids"] = user.additional_gids
    if user.home and not any(e.startswith("HOME=") for e in process["env"]):
        process["env"].append(f"HOME={user.home}")

    if security is not None:
        apply_security(spec, security)

    apply_mounts(paths, spec, record, sandbox)
    join_sandbox(spec, record, sandbox, security)

    spec["linux"]["cgroupsPath"] = (
        f"{sandbox.cgroup_parent.rstrip('/')}/{record.id}"
        if sandbox.cgroup_parent else f"/servin/{sandbox.id}/{record.id}"
    )
    annotations = dict(config.annotations)
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": record.name,
        "io.kubernetes.cri.sandbox-id": sandbox.id,
        "io.kubernetes.cri.sandbox-name": sandbox.name,
        "io.kubernetes.cri.sandbox-namespace": sandbox.namespace,
        "io.kubernetes.cri.image-name": record.image_ref,
    })
    spec["annotations"] = annotations
    return spec

def apply_security(
    spec: dict[str, Any], security: cri.LinuxContainerSecurityContext
) -> None:
    process = spec["process"]
    if security.readonly_rootfs:
        spec["root"]["readonly"] = True
    if security.no_new_privs:
        process["noNewPrivileges"] = True
    if security.privileged:
        # Privileged: every capability, no masked or read-only kernel paths, writable sysfs.
        all_caps = sorted(_all_capabilities())
        process["capabilities"] = {
            k: list(all_caps) for k in ("bounding", "effective", "permitted")
        }
        spec["linux"]["maskedPaths"] = []
        spec["linux"]["readonlyPaths"] = []
        for mount in spec["mounts"]:
            if mount["type"] in ("sysfs", "cgroup"):
                mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]
        spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        return
    caps = security.capabilities
    if caps is not None:
        current = list(ocispec.DEFAULT_CAPABILITIES)
        drops = {_cap_name(c) for c in caps.drop_capabilities}
        adds = [_cap_name(c) for c in caps.add_capabilities]
        if "CAP_ALL" in drops:
            current = []
        current = [c for c in current if c not in drops]
        if "CAP_ALL" in adds:
            current = sorted(_all_capabilities())
        else:
            current += [c for c in adds if c not in current]
        process["capabilities"] = {
            k: list(current) for k in ("bounding", "effective", "permitted")
        }

def apply_mounts(
    paths: Paths, spec: dict[str, Any], record: ContainerRecord, sandbox: SandboxRecord
) -> None:
    sandbox_dir = paths.sandbox_dir(sandbox.id)
    targets = {m.container_path for m in record.mounts}
    extra: list[dict[str, Any]] = []
    for name in ("hostname", "hosts", "resolv.conf"):
        destination = f"/etc/{name}"
        if destination not in targets:
            extra.append({"destination": destination, "type": "bind",
                          "source": str(sandbox_dir / name),
                          "options": ["rbind", "rprivate", "rw"]})
    shm = paths.sandbox_state_dir(sandbox.id) / "shm"
    if sandbox.namespace_modes.get("ipc") != "NODE":
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
        spec["mounts"].append({"destination": "/dev/shm", "type": "bind",
                               "source": str(shm), "options": ["rbind", "rprivate", "rw"]})
    for mount in record.mounts:
        if not mount.container_path.startswith("/"):
            raise InvalidArgument(
                f"mount container_path {mount.container_path!r} is not absolute"
            )
        host = Path(mount.host_path)
        if not host.exists():
            # containerd creates a missing host path as a directory, as the kubelet expects.
            host.mkdir(parents=True, exist_ok=True)
        options = ["rbind", _propagation(mount.propagation)]
        options.append("ro" if mount.readonly else "rw")
        extra.append({"destination": mount.container_path, "type": "bind",
                      "source": str(host), "options": options})
    spec["mounts"].extend(extra)

def join_sandbox(
    spec: dict[str, Any], record: ContainerRecord, sandbox: SandboxRecord,
    security: cri.LinuxContainerSecurityContext | None,
) -> None:
    modes = sandbox.namespace_modes
    infra = f"/proc/{sandbox.infra_pid}/ns"
    if modes.get("network") == "NODE":
        ocispec.remove_namespace(spec, "network")
        ocispec.remove_namespace(spec, "uts")
    else:
        ocispec.set_namespace(spec, "network", sandbox.netns_path)
        ocispec.set_namespace(spec, "uts", f"{infra}/uts")
    if modes.get("ipc") == "NODE":
        ocispec.remove_namespace(spec, "ipc")
    else:
        ocispec.set_namespace(spec, "ipc", f"{infra}/ipc")
    pid_mode = modes.get("pid", "CONTAINER")
    if security is not None and security.namespace_options is not None:
        pid_mode = cri.NamespaceMode(security.namespace_options.pid).name
    if pid_mode == "NODE":
        ocispec.remove_namespace(spec, "pid")
    elif pid_mode == "POD":
        ocispec.set_namespace(spec, "pid", f"{infra}/pid")


def _propagation(name: str) -> str:
    return PROPAGATION_OPTIONS.get(cri.MountPropagation[name], "rprivate")


def _cap_name(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def _all_capabilities() -> set[str]:
    """Return every capability this kernel knows, read from /proc/sys/kernel/cap_last_cap."""
    names = [
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
        "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
        "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
        "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
        "PERFMON", "BPF", "CHECKPOINT_RESTORE",
    ]
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = len(names) - 1
    return {f"CAP_{n}" for n in names[: last + 1]}
