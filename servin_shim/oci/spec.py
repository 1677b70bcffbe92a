"""Building OCI runtime configs (config.json) for pod infra processes and containers.

The defaults follow what containerd's CRI plugin and CRI-O give a container: the capability
set below, the usual /proc, /dev and /sys mounts, masked and read-only kernel paths, and a
device cgroup that allows only the standard character devices.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

#: Symlinks followed while resolving one path inside a root, the kernel's own limit (MAXSYMLINKS).
MAX_SYMLINKS = 40

OCI_VERSION = "1.0.2"

#: Capabilities of a non-privileged container, the set containerd and CRI-O both default to.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]

READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_mounts(*, shm_source: Path | None) -> list[dict[str, Any]]:
    """Return the kernel filesystems every container gets."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    if shm_source is not None:
        # The pod's /dev/shm is one tmpfs shared by all its containers, like its IPC namespace.
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": str(shm_source),
                       "options": ["rbind", "rprivate", "rw"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    return mounts


def base_spec(*, root: Path, args: list[str], hostname: str = "") -> dict[str, Any]:
    """Return a complete, non-privileged OCI config for one process."""
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"PATH={DEFAULT_PATH}"],
            "cwd": "/",
            "capabilities": {
                key: list(DEFAULT_CAPABILITIES)
                for key in ("bounding", "effective", "permitted")
            },
            "noNewPrivileges": False,
        },
        "root": {"path": str(root), "readonly": False},
        "mounts": default_mounts(shm_source=None),
        "annotations": {},
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network"},
            ],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if hostname:
        spec["hostname"] = hostname
    return spec


def set_namespace(spec: dict[str, Any], ns_type: str, path: str | None) -> None:
    """Make the process join ``path`` for ``ns_type`` (or get a new one when path is None)."""
    namespaces = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != ns_type]
    entry: dict[str, str] = {"type": ns_type}
    if path:
        entry["path"] = path
    namespaces.append(entry)
    spec["linux"]["namespaces"] = namespaces


def remove_namespace(spec: dict[str, Any], ns_type: str) -> None:
    """Share the host's namespace of ``ns_type``."""
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] != ns_type
    ]


def merge_env(base: list[str], overrides: list[tuple[str, str]]) -> list[str]:
    """Apply ``overrides`` on top of ``base`` (``KEY=value`` strings), keeping the first order.

    An image entry without ``=`` is dropped with a warning: runc rejects such an entry and fails
    the whole start, and it sets no value anyway.
    """
    order: list[str] = []
    values: dict[str, str] = {}
    for entry in base:
        if "=" not in entry:
            log.warning("dropping image environment entry without '=' entry=%r", entry)
            continue
        key = entry.split("=", 1)[0]
        if key not in values:
            order.append(key)
        values[key] = entry
    for key, value in overrides:
        if key not in values:
            order.append(key)
        values[key] = f"{key}={value}"
    return [values[key] for key in order]


def image_env(env: list[str] | None) -> list[str]:
    """Return an image's environment, with the default PATH when the image sets none."""
    entries = list(env or [])
    if not any(entry.split("=", 1)[0] == "PATH" for entry in entries):
        entries.insert(0, f"PATH={DEFAULT_PATH}")
    return entries


def write_spec(bundle: Path, spec: dict[str, Any]) -> None:
    """Write config.json atomically, so a daemon crash never leaves a truncated bundle.

    There is no fsync: bundles live in the volatile state directory, which a power loss empties
    along with every container.
    """
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / "config.json.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, separators=(",", ":"))
    tmp.replace(bundle / "config.json")


def resolve_in_root(root: Path, path: str) -> Path:
    """Resolve ``path`` as the container would see it, with ``root`` as ``/``.

    Symlinks in the image are followed relative to ``root``, so an absolute or ``..`` link never
    leads out of the root filesystem to a host file. Missing components stay as written.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > MAX_SYMLINKS:
                raise InvalidArgument(
                    f"too many levels of symbolic links resolving {path!r} in the container "
                    "root: fix the image's symlinks"
                )
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


@dataclass
class MountInfo:
    """One line of /proc/self/mountinfo: the mount point and its propagation fields."""

    mount_point: str
    optional_fields: list[str]

    @property
    def shared(self) -> bool:
        return any(field.startswith("shared:") for field in self.optional_fields)

    @property
    def slave(self) -> bool:
        return any(field.startswith("master:") for field in self.optional_fields)


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def read_mountinfo(path: Path = Path("/proc/self/mountinfo")) -> list[MountInfo]:
    entries = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            entries.append(MountInfo(_unescape(fields[4]), fields[6:separator]))
    return entries


def mount_of(path: Path, mounts: list[MountInfo] | None = None) -> MountInfo:
    """Return the mount that contains ``path``: the deepest mount point, the last one mounted."""
    target = os.path.realpath(path)
    best: MountInfo | None = None
    for entry in mounts if mounts is not None else read_mountinfo():
        point = entry.mount_point
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = entry
    if best is None:
        raise InvalidArgument(f"no mount contains {str(path)!r}: check the host path")
    return best


def read_spec(bundle: Path) -> dict[str, Any]:
    with open(bundle / "config.json") as f:
        data: dict[str, Any] = json.load(f)
    return data
