"""Resolving a container's user against the image's own /etc/passwd and /etc/group.

The image's ``User`` may be ``name``, ``uid``, ``name:group``, ``uid:gid``, ``name:gid`` or
``uid:group``. Names are looked up in the files of the container's root filesystem, never the
host's, because the same name can mean another uid inside the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from servin_shim.errors import InvalidArgument
from servin_shim.oci.spec import resolve_in_root

log = logging.getLogger(__name__)

#: Largest uid or gid the kernel accepts; 2**32 - 1 is reserved as "no id".
MAX_ID = 2**32 - 2


@dataclass
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    username: str = ""
    home: str = ""


def _read_table(path: Path) -> list[list[str]]:
    """Read a colon-separated file of the image; a missing or unreadable file is empty.

    ``path`` must come from ``resolve_in_root``, so no symlink inside it leads out of the image.
    """
    try:
        if path.is_symlink() or not path.is_file():
            return []
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _passwd(rootfs: Path) -> list[list[str]]:
    # Rows with a non-numeric uid or gid are malformed, and libc skips them too.
    rows = _read_table(resolve_in_root(rootfs, "/etc/passwd"))
    return [row for row in rows if len(row) >= 4 and row[2].isdigit() and row[3].isdigit()]


def _group(rootfs: Path) -> list[list[str]]:
    rows = _read_table(resolve_in_root(rootfs, "/etc/group"))
    return [row for row in rows if len(row) >= 3 and row[2].isdigit()]


def _check_id(kind: str, value: int) -> int:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"invalid {kind} {value}: expected a number from 0 to {MAX_ID}")
    return value


def resolve_user(
    rootfs: Path,
    user_spec: str,
    *,
    run_as_user: int | None = None,
    run_as_username: str = "",
    run_as_group: int | None = None,
    supplemental_groups: list[int] | None = None,
    strict_groups: bool = False,
) -> ResolvedUser:
    """Resolve the CRI and image user settings into uid, gid and supplementary gids.

    ``run_as_user`` / ``run_as_username`` override the image's user part, ``run_as_group``
    overrides its group part, as kubelet and containerd apply them. ``strict_groups`` (the CRI
    ``Strict`` supplemental groups policy) leaves out the groups the image's /etc/group lists.
    """
    user_part, _, group_part = (user_spec or "").partition(":")
    if run_as_user is not None:
        user_part = str(_check_id("run_as_user", run_as_user))
    elif run_as_username:
        user_part = run_as_username
    if run_as_group is not None:
        group_part = str(_check_id("run_as_group", run_as_group))

    passwd = _passwd(rootfs)
    groups = _group(rootfs)
    uid, gid, name, home = 0, 0, "", "/"
    if user_part == "":
        user_part = "0"
    if user_part.isdigit():
        uid = _check_id("uid", int(user_part))
        entry = next((row for row in passwd if int(row[2]) == uid), None)
        if entry is not None:
            gid, name, home = int(entry[3]), entry[0], entry[5] if len(entry) > 5 else "/"
        # A uid the image does not list gets gid 0, as Docker and containerd give it.
    else:
        entry = next((row for row in passwd if row[0] == user_part), None)
        if entry is None:
            raise InvalidArgument(
                f"user {user_part!r} is not defined in the image's /etc/passwd: use a numeric "
                "uid or add the user to the image"
            )
        uid, gid, name = int(entry[2]), int(entry[3]), entry[0]
        home = entry[5] if len(entry) > 5 else "/"

    if group_part:
        if group_part.isdigit():
            gid = _check_id("gid", int(group_part))
        else:
            group = next((row for row in groups if row[0] == group_part), None)
            if group is None:
                raise InvalidArgument(
                    f"group {group_part!r} is not defined in the image's /etc/group: use a "
                    "numeric gid or add the group to the image"
                )
            gid = int(group[2])

    # containerd lists the primary gid among the supplementary ones too.
    additional: list[int] = [gid]
    if name and not strict_groups:
        for row in groups:
            members = row[3].split(",") if len(row) > 3 and row[3] else []
            if name in members:
                additional.append(int(row[2]))
    for extra in supplemental_groups or []:
        additional.append(_check_id("supplemental group", int(extra)))
    deduped = list(dict.fromkeys(additional))
    return ResolvedUser(uid=uid, gid=gid, additional_gids=deduped, username=name, home=home)
