"""Container security settings in the OCI spec: capabilities, privileged mode, devices, seccomp,
AppArmor, SELinux and the masked and read-only kernel paths.

The rules follow containerd's CRI plugin: a non-privileged container starts from
``spec.DEFAULT_CAPABILITIES``, the CRI add and drop lists (``ALL`` included) change it, and a
privileged container gets every capability, every host device, writable /sys and no masked
paths.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.config.models import SecurityConfig
from servin_shim.errors import InvalidArgument
from servin_shim.oci import seccomp
from servin_shim.oci import spec as ocispec

log = logging.getLogger(__name__)

CAPABILITY_KEYS = ("bounding", "effective", "permitted")

#: Every capability name in kernel order; the kernel's cap_last_cap says how many exist.
CAPABILITY_NAMES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]

#: Entries of the host /dev that a privileged container does not get as devices.
HOST_DEVICE_SKIP = {"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev", "console"}

APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")
SELINUX_ENFORCE = Path("/sys/fs/selinux/enforce")
#: The AppArmor profile that containerd and CRI-O load as RuntimeDefault.
APPARMOR_DEFAULT_PROFILE = "cri-containerd.apparmor.d"


def all_capabilities() -> list[str]:
    """Return every capability the kernel knows and the daemon holds, in kernel order.

    runc cannot grant a capability the daemon lacks itself (CAP_SYS_RESOURCE on some nodes), so
    "all" means the daemon's permitted set, as containerd's privileged mode does.
    """
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = len(CAPABILITY_NAMES) - 1
    held = _own_permitted()
    return [f"CAP_{name}" for index, name in enumerate(CAPABILITY_NAMES[: last + 1])
            if held >> index & 1]


def _own_permitted() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapPrm:"):
                return int(line.split(":", 1)[1], 16)
    except (OSError, ValueError):
        pass
    return (1 << len(CAPABILITY_NAMES)) - 1


def capability_name(name: str) -> str:
    """Normalise ``net_admin`` or ``CAP_NET_ADMIN`` to ``CAP_NET_ADMIN``; reject unknown names."""
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full != "CAP_ALL" and full.removeprefix("CAP_") not in CAPABILITY_NAMES:
        raise InvalidArgument(
            f"unknown capability {name!r}: use a Linux capability name such as NET_ADMIN, or ALL"
        )
    return full


def capabilities(add: list[str], drop: list[str]) -> list[str]:
    """Apply the CRI add and drop lists to the default set.

    ``ALL`` in drop empties the set before the adds, ``ALL`` in add grants every capability, and a
    capability dropped by name is removed last, so it loses even when also added (containerd's
    order).
    """
    adds = [capability_name(c) for c in add]
    drops = {capability_name(c) for c in drop}
    current = [] if "CAP_ALL" in drops else list(ocispec.DEFAULT_CAPABILITIES)
    if "CAP_ALL" in adds:
        current = all_capabilities()
    for cap in adds:
        if cap != "CAP_ALL" and cap not in current:
            current.append(cap)
    return [c for c in current if c not in drops]


def set_capabilities(spec: dict[str, Any], caps: list[str]) -> None:
    spec["process"]["capabilities"] = {key: list(caps) for key in CAPABILITY_KEYS}


def apply_privileged(spec: dict[str, Any]) -> None:
    """Give the process every capability and device, writable /sys and unmasked /proc."""
    set_capabilities(spec, all_capabilities())
    linux = spec["linux"]
    linux["maskedPaths"] = []
    linux["readonlyPaths"] = []
    for mount in spec["mounts"]:
        if mount["type"] in ("sysfs", "cgroup"):
            mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]
    linux["devices"] = host_devices()
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]


def host_devices(root: Path = Path("/dev")) -> list[dict[str, Any]]:
    """Return an OCI device entry for every character and block device under ``root``."""
    devices: list[dict[str, Any]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs
                      if not (Path(directory) == root and d in HOST_DEVICE_SKIP)]
        for name in files:
            if Path(directory) == root and name in HOST_DEVICE_SKIP:
                continue
            path = Path(directory) / name
            entry = _device_entry(path, str(path))
            if entry is not None:
                devices.append(entry)
    return devices


def _device_entry(host: Path, container_path: str) -> dict[str, Any] | None:
    try:
        info = os.stat(host)
    except OSError:
        return None
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        return None
    return {
        "path": container_path,
        "type": kind,
        "major": os.major(info.st_rdev),
        "minor": os.minor(info.st_rdev),
        "fileMode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
    }


def add_devices(spec: dict[str, Any], devices: list[cri.Device]) -> None:
    """Add the CRI devices to linux.devices and allow them in the device cgroup.

    A host path that is a directory adds every device below it under ``container_path``.
    """
    linux = spec["linux"]
    entries = linux.setdefault("devices", [])
    rules = linux["resources"].setdefault("devices", [])
    for device in devices:
        permissions = device.permissions or "rwm"
        if not permissions or set(permissions) - set("rwm"):
            raise InvalidArgument(
                f"invalid permissions {device.permissions!r} for device {device.host_path!r}: "
                "use a combination of r, w and m"
            )
        container_path = device.container_path or device.host_path
        host = Path(device.host_path)
        found: list[dict[str, Any]] = []
        if host.is_dir():
            for entry in host_devices(host):
                relative = os.path.relpath(entry["path"], host)
                entry["path"] = str(Path(container_path) / relative)
                found.append(entry)
        else:
            single = _device_entry(host, container_path)
            if single is None:
                raise InvalidArgument(
                    f"device {device.host_path!r} is not a character or block device on this "
                    "node: check the host path"
                )
            found.append(single)
        for entry in found:
            entries.append(entry)
            rules.append({"allow": True, "type": entry["type"], "major": entry["major"],
                          "minor": entry["minor"], "access": permissions})


def masked_and_readonly_paths(
    spec: dict[str, Any], security: cri.LinuxContainerSecurityContext
) -> None:
    """Use the CRI's masked and read-only path lists; an empty list keeps the defaults."""
    if security.masked_paths:
        spec["linux"]["maskedPaths"] = list(security.masked_paths)
    if security.readonly_paths:
        spec["linux"]["readonlyPaths"] = list(security.readonly_paths)


def seccomp_profile(
    requested: cri.SecurityProfile | None, profile_path: str, caps: list[str],
    config: SecurityConfig, *, privileged: bool,
) -> dict[str, Any] | None:
    """Return the linux.seccomp object for a container or pod, or None for unconfined.

    The CRI ``seccomp`` message (``requested``) wins over the deprecated
    ``seccomp_profile_path`` string. When the request sets neither, ``config.seccomp`` chooses
    RuntimeDefault (true) or unconfined.
    """
    kind, localhost = _requested_seccomp(requested, profile_path)
    if not config.seccomp:
        if kind not in ("", "unconfined"):
            log.info("seccomp is disabled in the configuration, ignoring profile=%s", kind)
        return None
    if kind == "":
        # A privileged container runs unconfined unless the request names a profile.
        kind = "unconfined" if privileged else "runtime/default"
    if kind == "unconfined":
        return None
    if kind == "runtime/default":
        return seccomp.default_profile(caps)
    return seccomp.localhost_profile(localhost, caps)


def _requested_seccomp(requested: cri.SecurityProfile | None, path: str) -> tuple[str, str]:
    """Return (kind, localhost path) with kind one of "", runtime/default, unconfined, localhost."""
    if requested is not None:
        kind = cri.SecurityProfileProfileType(requested.profile_type)
        if kind == cri.SecurityProfileProfileType.Unconfined:
            return "unconfined", ""
        if kind == cri.SecurityProfileProfileType.Localhost:
            return "localhost", requested.localhost_ref
        return "runtime/default", ""
    if not path:
        return "", ""
    if path in seccomp.RUNTIME_DEFAULT_NAMES:
        return "runtime/default", ""
    if path == seccomp.UNCONFINED_NAME:
        return "unconfined", ""
    if path.startswith(seccomp.LOCALHOST_PREFIX):
        return "localhost", path.removeprefix(seccomp.LOCALHOST_PREFIX)
    raise InvalidArgument(
        f"invalid seccomp profile {path!r}: use runtime/default, unconfined or localhost/<path>"
    )


def apparmor_enabled() -> bool:
    try:
        return APPARMOR_ENABLED.read_text().strip() == "Y"
    except OSError:
        return False


def selinux_enabled() -> bool:
    return SELINUX_ENFORCE.exists()


def apply_apparmor(
    spec: dict[str, Any], security: cri.LinuxContainerSecurityContext | None,
    config: SecurityConfig, *, container_id: str, privileged: bool,
) -> None:
    """Set process.apparmorProfile when AppArmor is configured and enabled on the host."""
    name = _requested_apparmor(security)
    if name == "unconfined" or (name == "" and privileged):
        return
    if not config.apparmor or not apparmor_enabled():
        if name not in ("", "runtime/default"):
            log.warning("AppArmor is not enabled on this node, running without profile=%s "
                        "container=%s", name, container_id)
        return
    spec["process"]["apparmorProfile"] = (
        APPARMOR_DEFAULT_PROFILE if name in ("", "runtime/default") else name
    )


def _requested_apparmor(security: cri.LinuxContainerSecurityContext | None) -> str:
    """Return "", runtime/default, unconfined or a profile name from the CRI fields."""
    if security is None:
        return ""
    if security.apparmor is not None:
        kind = cri.SecurityProfileProfileType(security.apparmor.profile_type)
        if kind == cri.SecurityProfileProfileType.Unconfined:
            return "unconfined"
        if kind == cri.SecurityProfileProfileType.Localhost:
            return security.apparmor.localhost_ref.removeprefix("localhost/")
        return "runtime/default"
    return security.apparmor_profile.removeprefix("localhost/")


def apply_selinux(
    spec: dict[str, Any], options: cri.SeLinuxOption | None, config: SecurityConfig,
    *, container_id: str,
) -> None:
    """Set process.selinuxLabel from the CRI SELinux options when SELinux is usable."""
    if options is None or not (options.user or options.role or options.type or options.level):
        return
    label = ":".join([options.user or "system_u", options.role or "system_r",
                      options.type or "container_t", options.level or "s0"])
    if not config.selinux or not selinux_enabled():
        log.warning("SELinux is not enabled on this node, ignoring label=%s container=%s",
                    label, container_id)
        return
    spec["process"]["selinuxLabel"] = label
    spec["linux"]["mountLabel"] = label


#: Sysctl prefixes that belong to the IPC namespace; ``kernel.sem`` is matched exactly.
IPC_SYSCTL_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")


def pod_sysctls(sysctls: dict[str, str], modes: dict[str, str]) -> dict[str, str]:
    """Validate the pod's sysctls and return them in dotted form for linux.sysctl.

    Only sysctls of namespaces the pod owns are accepted: ``net.*`` needs the pod network
    namespace and the IPC ones need the pod IPC namespace. Anything else would change the host.
    """
    out: dict[str, str] = {}
    for raw_name, value in sysctls.items():
        name = _dotted_sysctl(raw_name)
        if name.startswith("net."):
            if modes.get("network") == "NODE":
                raise InvalidArgument(
                    f"sysctl {raw_name!r} is not allowed with host network: it would change the "
                    "host's network settings, so remove it or use the pod network"
                )
        elif name == "kernel.sem" or name.startswith(IPC_SYSCTL_PREFIXES):
            if modes.get("ipc") == "NODE":
                raise InvalidArgument(
                    f"sysctl {raw_name!r} is not allowed with host IPC: it would change the "
                    "host's IPC settings, so remove it or use the pod IPC namespace"
                )
        else:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is not namespaced: a pod may set only net.*, kernel.shm*, "
                "kernel.msg*, kernel.sem and fs.mqueue.* sysctls"
            )
        out[name] = value
    return out


def _dotted_sysctl(name: str) -> str:
    """Convert ``net/ipv4/conf/eth0.100/forwarding`` to the dotted form with ``/`` for dots."""
    if "/" not in name:
        return name
    return name.replace(".", "\0").replace("/", ".").replace("\0", "/")
