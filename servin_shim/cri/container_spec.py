"""The OCI config.json of a container, built from the image config and the CRI ContainerConfig.

Process arguments follow kubelet's rule, the user resolves against the image's own files, and
the container joins its pod's namespaces and shared /etc files. Security settings live in
``oci.security`` and resource limits in ``oci.resources``; this module decides which apply.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.config.models import Spec as DaemonSpec
from servin_shim.cri.context import Paths
from servin_shim.errors import FailedPrecondition, InvalidArgument
from servin_shim.oci import resources as ociresources
from servin_shim.oci import security as ocisecurity
from servin_shim.oci import spec as ocispec
from servin_shim.oci.users import ResolvedUser, resolve_user
from servin_shim.state.records import ContainerRecord, Mount, SandboxRecord

log = logging.getLogger(__name__)

PROPAGATION_OPTIONS = {
    cri.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}

#: Annotations that carry the CRI stdin settings, which the OCI process object has no field for.
STDIN_ANNOTATION = "io.servin.container.stdin"
STDIN_ONCE_ANNOTATION = "io.servin.container.stdin-once"


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
    """Convert an image StopSignal (``SIGINT``, ``INT`` or ``2``) into a number; SIGTERM if empty."""
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
    image_config: dict[str, Any], root: Path, *, settings: DaemonSpec | None = None,
    target_pid: Callable[[str], int] | None = None,
) -> dict[str, Any]:
    """Return the config.json of a container.

    ``settings`` is the daemon configuration's ``spec`` (defaults when None). ``target_pid``
    returns the pid of a running container of the pod, for the CRI ``TARGET`` pid mode.
    """
    settings = settings or DaemonSpec()
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
    process["env"] = container_env(image_config.get("Env"), config.envs)
    process["cwd"] = working_dir(config.working_dir, str(image_config.get("WorkingDir") or ""))
    process["terminal"] = bool(config.tty)

    security = config.linux.security_context if config.linux is not None else None
    user = container_user(root, str(image_config.get("User") or ""), security, settings)
    process["user"] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        process["user"]["additionalGids"] = user.additional_gids
    if user.home and not any(e.startswith("HOME=") for e in process["env"]):
        process["env"].append(f"HOME={user.home}")

    apply_security(spec, record, sandbox, config, settings)
    apply_mounts(paths, spec, record, sandbox)
    join_sandbox(spec, record, sandbox, security, target_pid)

    resources = config.linux.resources if config.linux is not None else None
    limits, oom_score_adj = ociresources.linux_resources(
        resources, settings.resources, container_id=record.id
    )
    spec["linux"]["resources"].update(limits)
    process["oomScoreAdj"] = oom_score_adj
    spec["linux"]["cgroupsPath"] = ociresources.cgroups_path(
        ociresources.pod_cgroup_parent(sandbox.cgroup_parent, sandbox.id), record.id
    )

    annotations = dict(config.annotations)
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": record.name,
        "io.kubernetes.cri.sandbox-id": sandbox.id,
        "io.kubernetes.cri.sandbox-name": sandbox.name,
        "io.kubernetes.cri.sandbox-namespace": sandbox.namespace,
        "io.kubernetes.cri.image-name": record.image_ref,
        STDIN_ANNOTATION: str(bool(config.stdin)).lower(),
        STDIN_ONCE_ANNOTATION: str(bool(config.stdin_once)).lower(),
    })
    spec["annotations"] = annotations
    return spec


def container_env(image_env: list[str] | None, envs: list[cri.KeyValue]) -> list[str]:
    """Return the image's environment with the CRI envs applied on top, keeping image order."""
    overrides = []
    for kv in envs:
        if not kv.key:
            raise InvalidArgument(
                f"environment variable with an empty name and value {kv.value!r}: set a name"
            )
        overrides.append((kv.key, kv.value))
    return ocispec.merge_env(ocispec.image_env(image_env), overrides)


def working_dir(requested: str, image_dir: str) -> str:
    """Return the process cwd: the request's, else the image's WorkingDir, else ``/``."""
    if requested:
        if not requested.startswith("/"):
            raise InvalidArgument(
                f"working_dir {requested!r} is not absolute: use a path starting with /"
            )
        return requested
    if image_dir:
        # A relative WorkingDir in an image config is read relative to /.
        return os.path.normpath("/" + image_dir.lstrip("/"))
    return "/"


def container_user(
    root: Path, image_user: str, security: cri.LinuxContainerSecurityContext | None,
    settings: DaemonSpec,
) -> ResolvedUser:
    """Resolve the process user from the security context, the image User and the defaults."""
    run_as_user = None
    run_as_username = ""
    run_as_group = None
    # A message whose fields are all defaults is falsy in betterproto (Int64Value(0) included),
    # so presence is tested with "is not None".
    if security is not None:
        if security.run_as_user is not None:
            run_as_user = security.run_as_user.value
        if security.run_as_group is not None:
            run_as_group = security.run_as_group.value
        run_as_username = security.run_as_username
    if run_as_user is None and not run_as_username and not image_user:
        # spec.securityContext.runAsUser applies only when neither the request nor the image
        # names a user.
        default_uid = settings.security_context.run_as_user
        run_as_user = default_uid if default_uid else None
    policy = security.supplemental_groups_policy if security is not None else 0
    return resolve_user(
        root,
        image_user,
        run_as_user=run_as_user,
        run_as_username=run_as_username,
        run_as_group=run_as_group,
        supplemental_groups=list(security.supplemental_groups) if security is not None else [],
        strict_groups=policy == cri.SupplementalGroupsPolicy.Strict,
    )


def sandbox_privileged(sandbox: SandboxRecord) -> bool:
    """Return whether the pod's sandbox security context is privileged."""
    if not sandbox.config_b64:
        return False
    config = cri.PodSandboxConfig.parse(base64.b64decode(sandbox.config_b64))
    context = config.linux.security_context if config.linux is not None else None
    return bool(context and context.privileged)


def apply_security(
    spec: dict[str, Any], record: ContainerRecord, sandbox: SandboxRecord,
    config: cri.ContainerConfig, settings: DaemonSpec,
) -> None:
    """Set capabilities, privileged mode, devices, seccomp, LSM labels and kernel paths."""
    security = config.linux.security_context if config.linux is not None else None
    defaults = settings.security_context
    process = spec["process"]
    privileged = bool(security is not None and security.privileged) or defaults.privileged
    if security is not None and security.privileged and not sandbox_privileged(sandbox):
        # containerd and CRI-O reject this too: kubelet marks the sandbox privileged first.
        raise InvalidArgument(
            f"container {record.name!r} is privileged but its pod sandbox {sandbox.id} is not: "
            "set privileged in the pod's sandbox security context"
        )
    if (security is not None and security.readonly_rootfs) or defaults.read_only_root_filesystem:
        spec["root"]["readonly"] = True
    if (security is not None and security.no_new_privs) or settings.security.no_new_privileges:
        process["noNewPrivileges"] = True

    if privileged:
        ocisecurity.apply_privileged(spec)
        caps = ocisecurity.all_capabilities()
    else:
        requested = security.capabilities if security is not None else None
        caps = ocisecurity.capabilities(
            list(requested.add_capabilities) if requested else [],
            list(requested.drop_capabilities) if requested else [],
        )
        ocisecurity.set_capabilities(spec, caps)
        if security is not None:
            ocisecurity.masked_and_readonly_paths(spec, security)
    ocisecurity.add_devices(spec, list(config.devices))

    profile = ocisecurity.seccomp_profile(
        security.seccomp if security is not None else None,
        security.seccomp_profile_path if security is not None else "",
        caps, settings.security, privileged=privileged,
    )
    if profile is not None:
        spec["linux"]["seccomp"] = profile
    ocisecurity.apply_apparmor(spec, security, settings.security, container_id=record.id,
                               privileged=privileged)
    ocisecurity.apply_selinux(spec, security.selinux_options if security is not None else None,
                              settings.security, container_id=record.id)


def apply_mounts(
    paths: Paths, spec: dict[str, Any], record: ContainerRecord, sandbox: SandboxRecord
) -> None:
    """Add the pod's shared /etc files and /dev/shm and the CRI mounts to the spec."""
    sandbox_dir = paths.sandbox_dir(sandbox.id)
    targets = {m.container_path for m in record.mounts}
    extra: list[dict[str, Any]] = []
    for name in ("hostname", "hosts", "resolv.conf"):
        destination = f"/etc/{name}"
        if destination not in targets:
            extra.append({"destination": destination, "type": "bind",
                          "source": str(sandbox_dir / name),
                          "options": ["rbind", "rprivate", "rw"]})
    if "/dev/shm" not in targets:
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
        if sandbox.namespace_modes.get("ipc") == "NODE":
            # A host-IPC pod shares the host's POSIX shared memory, as it shares SysV IPC.
            shm = "/dev/shm"
        else:
            shm = str(paths.sandbox_state_dir(sandbox.id) / "shm")
        spec["mounts"].append({"destination": "/dev/shm", "type": "bind", "source": shm,
                               "options": ["rbind", "rprivate", "rw"]})
    propagations: set[str] = set()
    for mount in record.mounts:
        entry = bind_mount(mount)
        propagations.add(entry["options"][1])
        extra.append(entry)
    spec["mounts"].extend(extra)
    # Mount events reach a container only when its root mount passes them on too.
    if "rshared" in propagations:
        spec["linux"]["rootfsPropagation"] = "rshared"
    elif "rslave" in propagations:
        spec["linux"]["rootfsPropagation"] = "rslave"


def bind_mount(mount: Mount) -> dict[str, Any]:
    """Return the OCI bind mount for a CRI mount, checking that its propagation can work."""
    if not mount.container_path.startswith("/"):
        raise InvalidArgument(f"mount container_path {mount.container_path!r} is not absolute")
    if not mount.host_path.startswith("/"):
        raise InvalidArgument(f"mount host_path {mount.host_path!r} is not absolute")
    host = Path(mount.host_path)
    if not host.exists():
        # containerd creates a missing host path as a directory, as the kubelet expects.
        host.mkdir(parents=True, exist_ok=True)
    propagation = _propagation(mount.propagation)
    if propagation in ("rshared", "rslave"):
        check_propagation(host, propagation)
    options = ["rbind", propagation, "ro" if mount.readonly else "rw"]
    return {"destination": mount.container_path, "type": "bind", "source": str(host),
            "options": options}


def check_propagation(host: Path, propagation: str,
                      mounts: list[ocispec.MountInfo] | None = None) -> None:
    """Fail unless the host mount under ``host`` can propagate mounts as requested.

    ``rshared`` needs a shared host mount. ``rslave`` needs a shared or slave one, because a
    private mount never receives events from the host.
    """
    info = ocispec.mount_of(host, mounts)
    if propagation == "rshared" and not info.shared:
        raise FailedPrecondition(
            f"path {str(host)!r} is mounted on {info.mount_point!r}, which is not a shared mount: "
            "bidirectional propagation needs it, so run 'mount --make-rshared "
            f"{info.mount_point}' on the node"
        )
    if propagation == "rslave" and not (info.shared or info.slave):
        raise FailedPrecondition(
            f"path {str(host)!r} is mounted on {info.mount_point!r}, which is neither a shared "
            "nor a slave mount: host-to-container propagation needs one, so run "
            f"'mount --make-rshared {info.mount_point}' on the node"
        )


def join_sandbox(
    spec: dict[str, Any], record: ContainerRecord, sandbox: SandboxRecord,
    security: cri.LinuxContainerSecurityContext | None,
    target_pid: Callable[[str], int] | None = None,
) -> None:
    """Make the container share the pod's network, UTS, IPC and (by mode) PID namespaces."""
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
    target_id = ""
    if security is not None and security.namespace_options is not None:
        pid_mode = cri.NamespaceMode(security.namespace_options.pid).name
        target_id = security.namespace_options.target_id
    if pid_mode == "NODE":
        ocispec.remove_namespace(spec, "pid")
    elif pid_mode == "POD":
        ocispec.set_namespace(spec, "pid", f"{infra}/pid")
    elif pid_mode == "TARGET":
        if not target_id or target_pid is None:
            raise InvalidArgument(
                f"container {record.name!r} uses pid namespace mode TARGET without a target_id: "
                "set namespace_options.target_id to a running container of the pod"
            )
        ocispec.set_namespace(spec, "pid", f"/proc/{target_pid(target_id)}/ns/pid")


def ensure_workdir(root: Path, cwd: str, uid: int, gid: int) -> None:
    """Create a working directory the image lacks, owned by the container's user.

    Docker does the same for a WORKDIR that no layer created. Existing directories keep
    their owner.
    """
    target = ocispec.resolve_in_root(root, cwd)
    if target.exists():
        return
    missing = []
    path = target
    while not path.exists() and path != root:
        missing.append(path)
        path = path.parent
    try:
        for directory in reversed(missing):
            directory.mkdir(mode=0o755)
            os.chown(directory, uid, gid)
    except OSError as exc:
        raise InvalidArgument(
            f"failed to create working directory {cwd!r} in the container: {exc.strerror}"
        ) from None
    log.debug("created missing working directory cwd=%s uid=%d gid=%d", cwd, uid, gid)


def _propagation(name: str) -> str:
    try:
        return PROPAGATION_OPTIONS[cri.MountPropagation[name]]
    except KeyError:
        raise InvalidArgument(
            f"invalid mount propagation {name!r}: use PROPAGATION_PRIVATE, "
            "PROPAGATION_HOST_TO_CONTAINER or PROPAGATION_BIDIRECTIONAL"
        ) from None
