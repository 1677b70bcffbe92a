"""Building OCI runtime configs (config.json) for pod infra processes and containers.

The defaults follow what containerd's CRI plugin and CRI-O give a container: the capability
set below, the usual /proc, /dev and /sys mounts, masked and read-only kernel paths, and a
device cgroup that allows only the standard character devices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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

    An entry without ``=`` is kept as it is: runc passes it through and the image's author
    wrote it that way, so dropping it or failing would be worse.
    """
    order: list[str] = []
    values: dict[str, str] = {}
    for entry in base:
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
    """Write config.json atomically, so a crash never leaves a truncated bundle."""
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / "config.json.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(bundle / "config.json")


def read_spec(bundle: Path) -> dict[str, Any]:
    with open(bundle / "config.json") as f:
        data: dict[str, Any] = json.load(f)
    return data
