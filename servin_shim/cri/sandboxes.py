"""Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox and their state.

A sandbox is a set of namespaces held open by an infra process. By default the infra process is
Debian's static ``catatonit -P`` bind-mounted into an empty root, so no pause image needs to be
pulled. When a sandbox image is configured, that image's entrypoint runs instead. The network
namespace is a persistent file (see ``servin_shim.network.netns``) that the infra joins.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

from servin_shim.api.runtime import v1 as cri
from servin_shim.cri.context import RuntimeContext, new_id, now_ns
from servin_shim.errors import FailedPrecondition, InvalidArgument, NotFound, ServinError
from servin_shim.oci import resources as ociresources
from servin_shim.oci import cgroups, rootfs, seccomp
from servin_shim.oci import security as ocisecurity
from servin_shim.oci import spec as ocispec
from servin_shim.oci.shim import ContainerShim
from servin_shim.state.records import (
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    SandboxRecord,
)

log = logging.getLogger(__name__)

#: Size of a pod's shared /dev/shm, the 64 MiB default of Docker, containerd and CRI-O.
SHM_SIZE = 64 * 1024 * 1024

#: How long the infra process gets to exit after SIGKILL before stop gives up waiting.
INFRA_KILL_WAIT = 10.0

#: Maximum hostname length in bytes that sethostname(2) accepts (HOST_NAME_MAX on Linux).
#: RFC 1123 allows 253 characters, but runc fails on a hostname the kernel rejects.
MAX_HOSTNAME_LENGTH = 64
#: One RFC 1123 label: letters, digits and inner hyphens, 1 to 63 characters.
HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def namespace_modes(config: cri.PodSandboxConfig) -> dict[str, str]:
    """Return the CRI namespace mode names for network, pid and ipc (and a TARGET id)."""
    options = None
    if config.linux and config.linux.security_context:
        options = config.linux.security_context.namespace_options
    if options is None:
        return {"network": "POD", "pid": "CONTAINER", "ipc": "POD", "target_id": ""}
    modes = {
        "network": cri.NamespaceMode(options.network).name,
        "pid": cri.NamespaceMode(options.pid).name,
        "ipc": cri.NamespaceMode(options.ipc).name,
        "target_id": options.target_id,
    }
    for kind in ("network", "pid", "ipc"):
        if modes[kind] == "TARGET":
            # The CRI allows TARGET only for a container's pid namespace, never for a pod.
            raise InvalidArgument(
                f"pod sandbox {kind} namespace mode TARGET is invalid: use POD, CONTAINER or "
                "NODE, and set TARGET on the container's pid namespace instead"
            )
    return modes


def validate_metadata(config: cri.PodSandboxConfig | None) -> cri.PodSandboxMetadata:
    if config is None or config.metadata is None:
        raise InvalidArgument("pod sandbox config has no metadata: name, namespace and uid are required")
    meta = config.metadata
    for field in ("name", "namespace", "uid"):
        if not getattr(meta, field):
            raise InvalidArgument(
                f"pod sandbox metadata.{field} is empty: kubelet always sets name, namespace "
                "and uid"
            )
    return meta


def validate_hostname(hostname: str) -> None:
    """Reject a pod hostname that is no RFC 1123 hostname or longer than the kernel accepts."""
    if not hostname:
        return  # The node's name is used instead.
    if len(hostname.encode()) > MAX_HOSTNAME_LENGTH:
        raise InvalidArgument(
            f"pod hostname {hostname!r} is {len(hostname.encode())} bytes long: the kernel "
            f"accepts at most {MAX_HOSTNAME_LENGTH}"
        )
    for label in hostname.split("."):
        if not HOSTNAME_LABEL.fullmatch(label):
            raise InvalidArgument(
                f"invalid pod hostname {hostname!r}: each dot-separated label must be 1 to 63 "
                "letters, digits or inner hyphens (RFC 1123)"
            )


def validate_dns(dns: cri.DnsConfig | None) -> None:
    """Reject DNS settings that would write a malformed or extra line into resolv.conf."""
    if dns is None:
        return
    for server in dns.servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(
                f"invalid DNS server {server!r}: dns_config.servers must be IP addresses"
            ) from None
    for field, values in (("searches", dns.searches), ("options", dns.options)):
        for value in values:
            if not value or any(ch.isspace() for ch in value):
                raise InvalidArgument(
                    f"invalid DNS {field} entry {value!r}: dns_config.{field} entries must be "
                    "non-empty and contain no whitespace or newline"
                )


def resolv_conf(dns: cri.DnsConfig | None) -> str | None:
    """Render resolv.conf from the pod's DNS config; None means copy the host's."""
    if dns is None or not (dns.servers or dns.searches or dns.options):
        return None
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


class SandboxManager:
    """Runs, stops and removes pod sandboxes; ``shims`` maps sandbox id to its infra shim."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.shims: dict[str, ContainerShim] = {}

    async def run(self, config: cri.PodSandboxConfig | None, runtime_handler: str) -> str:
        if config is None:
            raise InvalidArgument("RunPodSandbox has no config: send a PodSandboxConfig")
        meta = validate_metadata(config)
        validate_hostname(config.hostname)
        validate_dns(config.dns_config)
        runtime = self.ctx.runtime(runtime_handler)
        modes = namespace_modes(config)
        record = SandboxRecord(
            id=new_id(),
            name=meta.name,
            namespace=meta.namespace,
            uid=meta.uid,
            attempt=meta.attempt,
            created_at=now_ns(),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            hostname=config.hostname,
            log_directory=config.log_directory,
            runtime_handler=runtime.name,
            cgroup_parent=config.linux.cgroup_parent if config.linux else "",
            namespace_modes=modes,
            config_b64=base64.b64encode(bytes(config)).decode(),
        )
        # Reserving the name first makes a concurrent duplicate fail before any side effect.
        self.ctx.metadata.add_sandbox(record)
        log.info("running pod sandbox id=%s pod=%s/%s", record.id, record.namespace, record.name)
        async with self.ctx.lock(record.id):
            try:
                await self._setup(record, config)
            except BaseException as exc:
                log.error("failed to run pod sandbox id=%s handler=%s: %s",
                          record.id, record.runtime_handler, exc)
                await self._discard(record)
                raise
        return record.id

    async def _discard(self, record: SandboxRecord) -> None:
        """Undo a failed RunPodSandbox: processes, mounts, files, cgroup and record.

        Every failure here is logged and not raised, so the caller reports the error that made
        the sandbox fail rather than an error of the rollback.
        """
        try:
            await self._teardown(record)
            self._remove_files(record)
            self.ctx.metadata.delete_sandbox(record.id)
        except Exception:
            log.exception("failed to roll back pod sandbox id=%s", record.id)
        self.ctx.locks.pop(record.id, None)

    async def _setup(self, record: SandboxRecord, config: cri.PodSandboxConfig) -> None:
        ctx = self.ctx
        persistent = ctx.paths.sandbox_dir(record.id)
        volatile = ctx.paths.sandbox_state_dir(record.id)
        persistent.mkdir(parents=True, exist_ok=True)
        volatile.mkdir(parents=True, exist_ok=True)
        host_network = record.namespace_modes["network"] == "NODE"
        host_ipc = record.namespace_modes["ipc"] == "NODE"
        host_pid = record.namespace_modes["pid"] == "NODE"
        linux = config.linux or cri.LinuxPodSandboxConfig()
        sysctls = ocisecurity.pod_sysctls(dict(linux.sysctls), record.namespace_modes)
        # Port mappings stay in the record for the network plugin and PodSandboxStatus.
        record.extra["port_mappings"] = [
            {"protocol": cri.Protocol(p.protocol).name, "container_port": p.container_port,
             "host_port": p.host_port, "host_ip": p.host_ip}
            for p in config.port_mappings
        ]

        self._write_etc_files(record, config, persistent, host_network)

        if not host_network:
            record.netns_path = str(await ctx.netns.create(record.id))

        if not host_ipc:
            # The sandbox id is new, so nothing is mounted here yet.
            shm = volatile / "shm"
            shm.mkdir(exist_ok=True)
            rootfs.mount("shm", shm, "tmpfs", rootfs.MS_NOSUID | rootfs.MS_NODEV,
                         f"mode=1777,size={SHM_SIZE}")

        bundle = volatile / "bundle"
        spec = await self._infra_spec(record, bundle, linux.security_context)
        if sysctls:
            spec["linux"]["sysctl"] = sysctls
        if host_pid:
            ocispec.remove_namespace(spec, "pid")
        if host_ipc:
            ocispec.remove_namespace(spec, "ipc")
        if host_network:
            ocispec.remove_namespace(spec, "network")
            ocispec.remove_namespace(spec, "uts")
            # runc cannot set a hostname without a UTS namespace of its own.
            spec.pop("hostname", None)
        else:
            ocispec.set_namespace(spec, "network", record.netns_path)
        spec["linux"]["cgroupsPath"] = ociresources.cgroups_path(
            ociresources.pod_cgroup_parent(record.cgroup_parent, record.id), record.id
        )
        spec["annotations"] = {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": record.id,
            "io.kubernetes.cri.sandbox-name": record.name,
            "io.kubernetes.cri.sandbox-namespace": record.namespace,
        }
        ocispec.write_spec(bundle, spec)

        shim = ContainerShim(
            record.id,
            bundle=bundle,
            io_dir=volatile / "io",
            log_path=None,
            runtime=ctx.runtime(record.runtime_handler),
            monitor=ctx.monitor,
            on_exit=lambda code, at: self._infra_exited(record.id, code),
        )
        record.infra_pid = await shim.start()
        self.shims[record.id] = shim
        record.state = SANDBOX_READY
        ctx.metadata.save_sandbox(record)
        log.info("pod sandbox ready id=%s infra_pid=%d", record.id, record.infra_pid)

    def _write_etc_files(
        self, record: SandboxRecord, config: cri.PodSandboxConfig, directory: Path,
        host_network: bool,
    ) -> None:
        hostname = record.hostname or os.uname().nodename
        if host_network:
            hostname = os.uname().nodename
        (directory / "hostname").write_text(hostname + "\n")
        content = resolv_conf(config.dns_config)
        if content is None:
            content = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
        (directory / "resolv.conf").write_text(content)
        if host_network and Path("/etc/hosts").exists():
            hosts = Path("/etc/hosts").read_text()
        else:
            hosts = (
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                f"127.0.1.1\t{hostname}\n"
            )
        (directory / "hosts").write_text(hosts)

    async def _infra_spec(
        self, record: SandboxRecord, bundle: Path,
        security: cri.LinuxSandboxSecurityContext | None,
    ) -> dict[str, Any]:
        ctx = self.ctx
        bundle.mkdir(parents=True, exist_ok=True)
        root = bundle / "rootfs"
        if ctx.sandbox_image:
            image = ctx.images.status(ctx.sandbox_image)
            if image is None:
                await ctx.images.pull(ctx.sandbox_image)
                image = ctx.images.status(ctx.sandbox_image)
            if image is None:
                raise NotFound(f"sandbox image {ctx.sandbox_image!r} not found after pull")
            if not image.pinned:
                # kubelet's image garbage collection skips pinned images, as for containerd's
                # sandbox image.
                ctx.images.pin(image.id)
            upper = ctx.paths.sandbox_dir(record.id) / "upper"
            rootfs.mount_overlay(
                ctx.images.rootfs_layers(image.id), upper,
                ctx.paths.sandbox_dir(record.id) / "work", root,
            )
            image_config = ctx.images.config(image.id).get("config") or {}
            args = list(image_config.get("Entrypoint") or []) + list(image_config.get("Cmd") or [])
            if not args:
                raise FailedPrecondition(
                    f"sandbox image {ctx.sandbox_image!r} has no Entrypoint or Cmd to run"
                )
            spec = ocispec.base_spec(root=root, args=args, hostname=record.hostname)
            spec["process"]["env"] = ocispec.image_env(image_config.get("Env"))
        else:
            root.mkdir(exist_ok=True)
            spec = ocispec.base_spec(root=root, args=["/catatonit", "-P"], hostname=record.hostname)
            spec["mounts"].append({
                "destination": "/catatonit", "type": "bind", "source": ctx.catatonit,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            })
        spec["root"]["readonly"] = True
        # Every sysfs mount of one network namespace shares a superblock, and the first mount,
        # the infra's, decides whether it is read-only. A read-only one would make /sys
        # read-only in privileged containers too, so the infra mounts it writable. The infra
        # has no capabilities to write to it, and other containers still mount it read-only.
        for mount in spec["mounts"]:
            if mount["type"] == "sysfs":
                mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]
        # The infra process only keeps the namespaces alive, so it needs no capability.
        spec["process"]["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted")}
        spec["process"]["noNewPrivileges"] = True
        if security is not None:
            self._apply_sandbox_security(spec, record, security)
        elif ctx.config.security.seccomp:
            spec["linux"]["seccomp"] = seccomp.default_profile([])
        return spec

    def _apply_sandbox_security(
        self, spec: dict[str, Any], record: SandboxRecord,
        security: cri.LinuxSandboxSecurityContext,
    ) -> None:
        """Run the infra process as the pod's user, under the pod's seccomp profile."""
        if security.run_as_user is not None:
            spec["process"]["user"]["uid"] = security.run_as_user.value
        if security.run_as_group is not None:
            spec["process"]["user"]["gid"] = security.run_as_group.value
        profile = ocisecurity.seccomp_profile(
            security.seccomp, security.seccomp_profile_path, [], self.ctx.config.security,
            privileged=security.privileged,
        )
        if profile is not None:
            spec["linux"]["seccomp"] = profile
        log.debug("pod sandbox security applied id=%s privileged=%s seccomp=%s", record.id,
                  security.privileged, profile is not None)

    async def _infra_exited(self, sandbox_id: str, code: int) -> None:
        # An infra that dies leaves the pod without its namespaces: kubelet must recreate it.
        try:
            record = self.ctx.metadata.get_sandbox(sandbox_id)
        except NotFound:
            return
        if record.state == SANDBOX_READY:
            log.warning("pod infra process exited, sandbox is no longer ready id=%s exit_code=%d",
                        sandbox_id, code)
        record.state = SANDBOX_NOTREADY
        self.ctx.metadata.save_sandbox(record)

    async def stop(self, sandbox_id: str, stop_containers) -> None:  # type: ignore[no-untyped-def]
        """Stop every container of the pod, then the infra process, then free the network."""
        try:
            record = self.ctx.metadata.get_sandbox(sandbox_id)
        except NotFound:
            log.debug("stop of unknown pod sandbox id=%s, nothing to do", sandbox_id)
            return
        await stop_containers(record.id)
        async with self.ctx.lock(record.id):
            infra_gone = await self._teardown(record)
            record = self.ctx.metadata.get_sandbox(record.id)
            record.state = SANDBOX_NOTREADY
            self.ctx.metadata.save_sandbox(record)
        if not infra_gone:
            raise ServinError(
                f"pod infra process {record.infra_pid} of sandbox {record.id} may still run: "
                "the runtime failed to kill it, see the daemon log; RemovePodSandbox still "
                "removes the sandbox"
            )
        log.info("stopped pod sandbox id=%s", record.id)

    async def _teardown(self, record: SandboxRecord) -> bool:
        """Kill the infra and release namespaces and mounts; return False if the infra may live.

        Every step runs even when an earlier one fails, and tolerates a past run. Failures are
        logged, not raised, so a failing runtime cannot pin a pod's mounts and network namespace.
        """
        ctx = self.ctx
        infra_gone = await self._kill_infra(record)
        try:
            await ctx.runtime(record.runtime_handler).delete(record.id, force=True)
        except (ServinError, OSError) as exc:
            log.warning("failed to delete runtime state of pod sandbox id=%s handler=%s: %s",
                        record.id, record.runtime_handler, exc)
        volatile = ctx.paths.sandbox_state_dir(record.id)
        for target in (volatile / "bundle" / "rootfs", volatile / "shm"):
            try:
                rootfs.unmount(target)
            except OSError as exc:
                log.warning("failed to unmount pod sandbox mount id=%s path=%s: %s",
                            record.id, target, exc)
        try:
            ctx.netns.remove(record.id)
        except OSError as exc:
            log.warning("failed to remove network namespace of pod sandbox id=%s: %s",
                        record.id, exc)
        return infra_gone

    async def _kill_infra(self, record: SandboxRecord) -> bool:
        """SIGKILL the infra process; return False if it may still run."""
        shim = self.shims.pop(record.id, None)
        if shim is not None:
            try:
                await shim.kill(signal.SIGKILL)
            except (ServinError, OSError) as exc:
                # The shim's pid is the live infra until the exit monitor reports its exit.
                log.warning("runtime failed to kill pod infra, signalling it directly id=%s "
                            "pid=%d: %s", record.id, shim.pid, exc)
                if shim.running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(shim.pid, signal.SIGKILL)
            if not await shim.wait(INFRA_KILL_WAIT):
                log.error("pod infra process did not exit after SIGKILL id=%s pid=%d",
                          record.id, shim.pid)
                return False
            return True
        try:
            await self.ctx.runtime(record.runtime_handler).kill(record.id, signal.SIGKILL)
        except NotFound:
            return True
        except (ServinError, OSError) as exc:
            # Without a shim, the recorded pid may belong to another process by now. So it is
            # not signalled, and only a pid that no longer exists proves the infra is gone.
            log.warning("failed to kill pod infra id=%s handler=%s: %s",
                        record.id, record.runtime_handler, exc)
            return not record.infra_pid or not _pid_alive(record.infra_pid)
        return True

    def _remove_files(self, record: SandboxRecord) -> None:
        """Delete the sandbox's directories and the pod cgroup that servin-shim created."""
        rootfs.remove_tree(self.ctx.paths.sandbox_state_dir(record.id))
        rootfs.remove_tree(self.ctx.paths.sandbox_dir(record.id))
        if not record.cgroup_parent:
            # The pod cgroup is ours only when kubelet gave no parent; kubelet removes its own.
            cgroups.remove_cgroup(ociresources.pod_cgroup_parent("", record.id))

    async def remove(self, sandbox_id: str, remove_containers) -> None:  # type: ignore[no-untyped-def]
        """Remove the pod's containers, its files and its record."""
        try:
            record = self.ctx.metadata.get_sandbox(sandbox_id)
        except NotFound:
            log.debug("remove of unknown pod sandbox id=%s, nothing to do", sandbox_id)
            return
        await remove_containers(record.id)
        async with self.ctx.lock(record.id):
            if not await self._teardown(record):
                # Keeping the record would not help: no later call could kill the process.
                log.error("removing pod sandbox whose infra process may still run id=%s pid=%d",
                          record.id, record.infra_pid)
            try:
                self._remove_files(record)
            except OSError as exc:
                log.error("failed to remove files of pod sandbox id=%s: %s", record.id, exc)
            self.ctx.metadata.delete_sandbox(record.id)
        self.ctx.locks.pop(record.id, None)
        log.info("removed pod sandbox id=%s", record.id)

    def get(self, sandbox_id: str) -> SandboxRecord:
        return self.ctx.metadata.get_sandbox(sandbox_id)

    def resolve(self, id_or_prefix: str) -> SandboxRecord:
        """Find a sandbox by full id or unique id prefix, as crictl allows."""
        if not id_or_prefix:
            raise InvalidArgument("pod sandbox id is empty")
        try:
            return self.ctx.metadata.get_sandbox(id_or_prefix)
        except NotFound:
            matches = [s for s in self.ctx.metadata.sandboxes() if s.id.startswith(id_or_prefix)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(
                    f"pod sandbox id prefix {id_or_prefix!r} is ambiguous: it matches "
                    f"{len(matches)} sandboxes"
                ) from None
            raise


def _pid_alive(pid: int) -> bool:
    """Return True if ``pid`` exists and is no zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
