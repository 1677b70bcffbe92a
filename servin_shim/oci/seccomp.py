"""Seccomp profiles for containers: the shipped RuntimeDefault, Unconfined and Localhost files.

The RuntimeDefault profile lives in ``profiles/seccomp-default.json``. It is an OCI
``linux.seccomp`` object with three extra keys that this module resolves before the profile goes
into config.json:

- ``architecturesByMachine`` maps ``uname -m`` to the OCI architecture list for that host.
- ``requiresCapabilities`` on a rule keeps the rule only when the container has all of them.
- ``excludesCapabilities`` on a rule keeps the rule only when it has none of them.

Its default action is ``SCMP_ACT_ERRNO`` (EPERM), so a syscall missing from the allow-list fails
the way an unprivileged caller would expect.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_PROFILE_PATH = Path(__file__).with_name("profiles") / "seccomp-default.json"

#: Values of the CRI ``seccomp_profile_path`` string form (before the SecurityProfile message).
RUNTIME_DEFAULT_NAMES = ("runtime/default", "docker/default")
UNCONFINED_NAME = "unconfined"
LOCALHOST_PREFIX = "localhost/"


@functools.cache
def _load_default(path: Path = DEFAULT_PROFILE_PATH) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


def default_profile(capabilities: list[str], machine: str | None = None) -> dict[str, Any]:
    """Return the RuntimeDefault profile for a container with ``capabilities``, in OCI form."""
    template = _load_default()
    caps = set(capabilities)
    machine = machine or os.uname().machine
    architectures = template.get("architecturesByMachine", {}).get(machine)
    if architectures is None:
        # libseccomp then filters only the native architecture, which is still a valid filter.
        log.warning("no seccomp architecture list for machine=%s, using the native one", machine)
        architectures = []
    rules: list[dict[str, Any]] = []
    for rule in template["syscalls"]:
        required = set(rule.get("requiresCapabilities", []))
        excluded = set(rule.get("excludesCapabilities", []))
        if not required <= caps or excluded & caps:
            continue
        rules.append({
            key: copy.deepcopy(value) for key, value in rule.items()
            if key not in ("requiresCapabilities", "excludesCapabilities")
        })
    profile: dict[str, Any] = {
        "defaultAction": template["defaultAction"],
        "syscalls": rules,
    }
    if "defaultErrnoRet" in template:
        profile["defaultErrnoRet"] = template["defaultErrnoRet"]
    if architectures:
        profile["architectures"] = list(architectures)
    return profile


def localhost_profile(path: str, capabilities: list[str]) -> dict[str, Any]:
    """Load a node-local profile file (the CRI ``Localhost`` type); the path must be absolute."""
    if not path.startswith("/"):
        raise InvalidArgument(
            f"seccomp profile path {path!r} is not absolute: kubelet sends the absolute path "
            "of a file under its seccomp root"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InvalidArgument(
            f"seccomp profile {path!r} not found: create it on the node or use RuntimeDefault"
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"failed to read seccomp profile {path!r}: {exc}") from None
    if not isinstance(data, dict) or "defaultAction" not in data:
        raise InvalidArgument(
            f"invalid seccomp profile {path!r}: expected a JSON object with a defaultAction"
        )
    return _to_oci(data, set(capabilities))


#: OCI names of the native architecture per ``uname -m``, for Docker-format ``archMap`` entries.
_NATIVE_ARCH = {
    "x86_64": "SCMP_ARCH_X86_64",
    "aarch64": "SCMP_ARCH_AARCH64",
    "armv7l": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
}

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}


def _to_oci(data: dict[str, Any], caps: set[str]) -> dict[str, Any]:
    """Convert a profile that may use Docker's format (``archMap``, ``includes``) to OCI form."""
    profile = {key: value for key, value in data.items()
               if key not in ("archMap", "syscalls", "architectures")}
    architectures = list(data.get("architectures") or [])
    native = _NATIVE_ARCH.get(os.uname().machine, "")
    for entry in data.get("archMap") or []:
        if entry.get("architecture") == native:
            architectures = [entry["architecture"], *entry.get("subArchitectures", [])]
    if architectures:
        profile["architectures"] = architectures
    rules = []
    for rule in data.get("syscalls") or []:
        if not _conditions_hold(rule, caps, native):
            continue
        rule = {key: value for key, value in rule.items()
                if key not in ("includes", "excludes", "comment")}
        if "name" in rule and "names" not in rule:
            rule["names"] = [rule.pop("name")]
        rules.append(rule)
    if rules:
        profile["syscalls"] = rules
    return profile


def _conditions_hold(rule: dict[str, Any], caps: set[str], native: str) -> bool:
    """Evaluate Docker's ``includes``/``excludes`` capability and architecture conditions."""
    includes = rule.get("includes") or {}
    excludes = rule.get("excludes") or {}
    if not set(includes.get("caps") or []) <= caps:
        return False
    # Docker writes architectures as Go names (amd64), so compare both spellings.
    names = {native, _GO_ARCH.get(os.uname().machine, "")}
    if includes.get("arches") and not names & set(includes["arches"]):
        return False
    if set(excludes.get("caps") or []) & caps:
        return False
    return not (excludes.get("arches") and names & set(excludes["arches"]))
