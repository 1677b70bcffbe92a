"""The ServinCRIConfig document as pydantic models: field names, defaults, types and checks.

Attributes are snake_case and the document keys are their camelCase aliases. Both spellings load.
Every model forbids unknown keys. A few settings appear twice in the document for compatibility
(``spec.networkPlugin`` and ``spec.network.plugin``, for example): whichever spelling the document
uses fills the other, and giving both with different values is an error.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from servin_shim.config.errors import show_value
from servin_shim.config.units import ByteSize, Duration, MicrosecondDuration, format_duration
from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

#: State directory that the default paths of the document live under (``--state-dir`` default).
DEFAULT_STATE_DIR = Path("/run/servin")
DEFAULT_CRI_SOCKET = str(DEFAULT_STATE_DIR / "servin.sock")
#: Runtime handlers that exist without being configured, with the binary the Debian packages use.
BUILTIN_RUNTIME_ENGINES: dict[str, Path] = {
    "runc": Path("/usr/sbin/runc"),
    "crun": Path("/usr/bin/crun"),
}
LOOPBACK_HOST = "127.0.0.1"

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]

_HANDLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?)+(?::\d{1,5})?")
_BRACKETED_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


def _invalid(kind: str, value: object, expected: str) -> PydanticCustomError:
    return PydanticCustomError(
        f"servin_{kind.lower().replace(' ', '_')}",
        "invalid {kind} {value}: expected {expected}",
        {"kind": kind, "value": show_value(value), "expected": expected},
    )


def _check_absolute_path(value: Path) -> Path:
    if not value.is_absolute():
        raise _invalid("path", str(value), "an absolute path starting with /")
    return value


def _check_handler_name(value: str) -> str:
    if not _HANDLER_NAME.fullmatch(value):
        raise _invalid(
            "runtime handler name", value, "letters, digits, '.', '_' or '-', such as runc"
        )
    return value


def _check_registry_host(value: str) -> str:
    if not (_REGISTRY_HOST.fullmatch(value) or _BRACKETED_IPV6.fullmatch(value)):
        raise _invalid(
            "registry host",
            value,
            "a host with an optional port such as docker.io or "
            "127.0.0.1:5000, without a scheme or path",
        )
    return value


def _normalise_endpoint(value: str) -> str:
    """Return the endpoint as a URL, adding https:// when the scheme is left out."""
    url = value if "://" in value else f"https://{value}"
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    if scheme not in ("http", "https") or not host or "?" in rest or "#" in rest:
        raise _invalid(
            "mirror endpoint",
            value,
            "a URL such as https://mirror.example or "
            "http://127.0.0.1:5000, or a host with an optional port",
        )
    _check_registry_host(host)
    return f"{scheme}://{host}/{path}".rstrip("/")


def _strip_unix_scheme(value: object) -> object:
    if isinstance(value, str) and value.startswith("unix://"):
        return value.removeprefix("unix://")
    return value


def _check_socket_path(value: str) -> str:
    if not value.startswith("/"):
        raise _invalid("socket path", value, "an absolute path such as /run/servin/servin.sock")
    return value


AbsolutePath = Annotated[Path, AfterValidator(_check_absolute_path)]
HandlerName = Annotated[str, AfterValidator(_check_handler_name)]
RegistryHost = Annotated[str, AfterValidator(_check_registry_host)]
MirrorEndpoint = Annotated[str, AfterValidator(_normalise_endpoint)]
SocketPath = Annotated[str, BeforeValidator(_strip_unix_scheme), AfterValidator(_check_socket_path)]


class TcpAddress(NamedTuple):
    """Host and port of the optional CRI TCP listener."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_LISTEN_FORM = "0, a port such as 10010 or an address such as 127.0.0.1:10010"


def _parse_listen(value: object) -> TcpAddress | None:
    """Parse criPort: 0 or null disables TCP, a bare port binds 127.0.0.1, host:port binds host."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, TcpAddress):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = LOOPBACK_HOST, str(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            if int(text) == 0:
                return None
            host, port_text = LOOPBACK_HOST, text
        else:
            host, _, port_text = text.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
    else:
        raise _invalid("listen address", value, _LISTEN_FORM)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _invalid("listen address", value, _LISTEN_FORM + ", with a port from 1 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _invalid("listen address", value, _LISTEN_FORM + ", with an IP address") from None
    return TcpAddress(host, int(port_text))


def _format_listen(value: TcpAddress | None) -> str | int:
    return 0 if value is None else str(value)


CriListen = Annotated[
    TcpAddress | None,
    BeforeValidator(_parse_listen),
    PlainSerializer(_format_listen, return_type=Any),
]


def _conflict(path: tuple[str, ...], value: object, other: str, other_value: object) -> Exception:
    return PydanticCustomError(
        "servin_conflict",
        "conflicting value {value}: expected the same value as {other} ({other_value}) or only "
        "one of the two keys",
        {
            "value": show_value(value),
            "other": other,
            "other_value": show_value(other_value),
            "path": path,
        },
    )


class Section(BaseModel):
    """Base of every part of the document: camelCase keys, snake_case attributes, no extras."""

    # Defaults are written as stored values (seconds, bytes), so they skip the text parsers.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    @model_validator(mode="before")
    @classmethod
    def _accept_empty_section(cls, data: Any) -> Any:
        """Read a key with no value (``spec:`` with every child commented out) as an empty section."""
        return {} if data is None else data


class Metadata(Section):
    """Identifying metadata of the document."""

    name: str = "default"


class RuntimeHandler(Section):
    """One OCI runtime that a CRI ``runtime_handler`` can select.

    After the enclosing RuntimeConfig is validated, runtime_engine and runtime_root are always set.
    """

    runtime_engine: AbsolutePath | None = None
    runtime_root: AbsolutePath | None = None
    runtime_type: Literal["oci"] = "oci"
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class HandlerInfo:
    """A resolved runtime handler: its name and the OCI runtime binary and state root it uses."""

    name: str
    runtime_engine: Path
    runtime_root: Path
    runtime_type: str = "oci"
    options: dict[str, Any] = field(default_factory=dict)


class RuntimeConfig(Section):
    """The default OCI runtime and the table of runtime handlers.

    The fields runtimeEngine, runtimeRoot and runtimeType describe the handler called ``name``.
    runtimeHandlers adds or replaces handlers by name on top of the built-in runc and crun.
    """

    name: HandlerName = "runc"
    version: str = ""
    runtime_type: Literal["oci"] = "oci"
    runtime_root: AbsolutePath | None = None
    runtime_engine: AbsolutePath | None = None
    runtime_handlers: dict[HandlerName, RuntimeHandler] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_handlers(self) -> RuntimeConfig:
        configured = dict(self.runtime_handlers)
        merged: dict[str, RuntimeHandler] = {
            name: RuntimeHandler(runtime_engine=engine)
            for name, engine in BUILTIN_RUNTIME_ENGINES.items()
        }
        merged.update(configured)

        main = merged.get(self.name, RuntimeHandler())
        for attribute, alias in (
            ("runtime_engine", "runtimeEngine"),
            ("runtime_root", "runtimeRoot"),
        ):
            if attribute not in self.model_fields_set or getattr(self, attribute) is None:
                continue
            section_value = getattr(self, attribute)
            handler_value = getattr(main, attribute)
            explicit_in_table = self.name in configured and attribute in main.model_fields_set
            if explicit_in_table and handler_value != section_value:
                raise _conflict(
                    ("runtimeHandlers", self.name, alias),
                    str(handler_value),
                    f"spec.runtime.{alias}",
                    str(section_value),
                )
            main = main.model_copy(update={attribute: section_value})
        merged[self.name] = main

        for name in sorted(merged):
            handler = merged[name]
            engine = handler.runtime_engine or BUILTIN_RUNTIME_ENGINES.get(name)
            if engine is None:
                path = (
                    ("runtimeEngine",)
                    if name == self.name and name not in configured
                    else ("runtimeHandlers", name, "runtimeEngine")
                )
                raise PydanticCustomError(
                    "servin_missing",
                    "missing runtime engine for handler {name}: expected the absolute path of an "
                    "OCI runtime binary such as /usr/sbin/runc",
                    {"name": show_value(name), "path": path},
                )
            root = handler.runtime_root or DEFAULT_STATE_DIR / name
            merged[name] = handler.model_copy(
                update={"runtime_engine": engine, "runtime_root": root}
            )

        self.runtime_handlers = {name: merged[name] for name in sorted(merged)}
        resolved = self.runtime_handlers[self.name]
        self.runtime_engine = resolved.runtime_engine
        self.runtime_root = resolved.runtime_root
        self.runtime_type = resolved.runtime_type
        return self

    def handler(self, name: str) -> HandlerInfo:
        """Return the handler called name, or raise InvalidArgument listing the defined handlers."""
        handler = self.runtime_handlers.get(name)
        if handler is None or handler.runtime_engine is None or handler.runtime_root is None:
            raise InvalidArgument(
                f"unknown runtime handler {show_value(name)}: expected one of "
                f"{', '.join(sorted(self.runtime_handlers))}, or add it under "
                "spec.runtime.runtimeHandlers in the config file"
            )
        return HandlerInfo(
            name=name,
            runtime_engine=handler.runtime_engine,
            runtime_root=handler.runtime_root,
            runtime_type=handler.runtime_type,
            options=dict(handler.options),
        )


class ImageServiceConfig(Section):
    """Image pull settings: default registry, timeout and concurrency."""

    default_registry: RegistryHost = "docker.io"
    pull_timeout: Annotated[Duration, Field(gt=0)] = 900.0
    parallel_pulls: Annotated[StrictInt, Field(ge=1)] = 3
    #: A pull that receives no bytes and unpacks nothing for this long is cancelled.
    progress_timeout: Annotated[Duration, Field(gt=0)] = 60.0


class PodSandboxConfig(Section):
    """The infra (pause) container of each pod sandbox."""

    image_repository: str = ""
    image_tag: str = ""

    @model_validator(mode="after")
    def _check_tag_has_repository(self) -> PodSandboxConfig:
        if self.image_tag and not self.image_repository:
            raise PydanticCustomError(
                "servin_missing",
                "missing imageRepository for imageTag {tag}: expected both keys, or neither to "
                "run the sandbox without an image",
                {"tag": show_value(self.image_tag), "path": ("imageRepository",)},
            )
        return self

    @property
    def infra_image(self) -> str | None:
        """Image reference of the infra container, or None to run catatonit without an image."""
        if not self.image_repository:
            return None
        if self.image_tag:
            return f"{self.image_repository}:{self.image_tag}"
        return self.image_repository


class SecurityContextConfig(Section):
    """Defaults for container security fields that a CRI request leaves unset."""

    run_as_user: Annotated[StrictInt, Field(ge=0)] = 0
    read_only_root_filesystem: StrictBool = False
    privileged: StrictBool = False


class ContainerConfig(Section):
    """Container defaults: runtime handler and log rotation."""

    default_runtime: HandlerName = "runc"
    log_driver: Literal["cri"] = "cri"
    log_max_size: ByteSize = 0
    log_max_files: Annotated[StrictInt, Field(ge=1)] = 5


class RegistryMirror(Section):
    """Mirror endpoints of one registry, tried in order before the registry itself."""

    endpoints: list[MirrorEndpoint] = Field(default_factory=list)
    skip_upstream: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _accept_endpoint_list(cls, data: Any) -> Any:
        return {"endpoints": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _check_reachable(self) -> RegistryMirror:
        if self.skip_upstream and not self.endpoints:
            raise PydanticCustomError(
                "servin_mirror",
                "invalid skipUpstream true with no endpoints: expected at least one endpoint, "
                "because otherwise no source is left to pull from",
                {"path": ("skipUpstream",)},
            )
        return self


class ImageConfig(Section):
    """Registries: the default one for short names, mirrors and registries reached over HTTP."""

    default_registry: RegistryHost = "docker.io"
    registry_mirrors: dict[RegistryHost, RegistryMirror] = Field(default_factory=dict)
    insecure_registries: list[RegistryHost] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _accept_mirror_list(cls, data: Any) -> Any:
        """Read a plain list of endpoints as the mirrors of the default registry."""
        if not isinstance(data, dict):
            return data
        key = "registryMirrors" if "registryMirrors" in data else "registry_mirrors"
        mirrors = data.get(key)
        if not isinstance(mirrors, list):
            return data
        registry = data.get("defaultRegistry", data.get("default_registry", "docker.io"))
        if not isinstance(registry, str):
            registry = "docker.io"
        return {**data, key: {registry: {"endpoints": mirrors}}}


class NetworkConfig(Section):
    """Pod network plugin and where its binaries and configuration live."""

    plugin: Literal["cni", "none"] = "cni"
    plugin_bin_dir: AbsolutePath = Path("/usr/lib/cni")
    plugin_conf_dir: AbsolutePath = Path("/etc/cni/net.d")


class SecurityConfig(Section):
    """Node-wide security features applied to every container."""

    apparmor: StrictBool = False
    selinux: StrictBool = False
    seccomp: StrictBool = True
    no_new_privileges: StrictBool = False


class ResourcesConfig(Section):
    """Defaults for container resource settings that a CRI request leaves unset."""

    cpu_cfs_period: MicrosecondDuration = 100_000
    cpu_cfs_quota: MicrosecondDuration = 0
    memory_swap: ByteSize = 0
    oom_score_adj: Annotated[StrictInt, Field(ge=-1000, le=1000)] = 0

    @field_validator("cpu_cfs_period")
    @classmethod
    def _check_period(cls, value: int) -> int:
        # The kernel accepts CFS periods from 1ms to 1s.
        if not 1_000 <= value <= 1_000_000:
            raise _invalid(
                "CPU CFS period",
                format_duration(value / 1_000_000),
                "a duration from 1ms to 1s such as 100ms (a plain number means seconds)",
            )
        return value

    @field_validator("cpu_cfs_quota")
    @classmethod
    def _check_quota(cls, value: int) -> int:
        # The kernel rejects quotas under 1ms. A quota of 0 leaves CPU time unlimited.
        if value != 0 and value < 1_000:
            raise _invalid(
                "CPU CFS quota",
                format_duration(value / 1_000_000),
                "0 for no limit or a duration of at least 1ms such as 50ms",
            )
        return value


# Settings that the document may give in two places: (spec attribute, section, section attribute).
_PAIRED_KEYS: tuple[tuple[str, str, str], ...] = (
    ("network_plugin", "network", "plugin"),
    ("cni_config_dir", "network", "plugin_conf_dir"),
    ("cni_bin_dir", "network", "plugin_bin_dir"),
)


class Spec(Section):
    """Everything the daemon can be configured with."""

    cri_socket: SocketPath = DEFAULT_CRI_SOCKET
    cri_port: CriListen = None
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    image_service: ImageServiceConfig = Field(default_factory=ImageServiceConfig)
    network_plugin: Literal["cni", "none"] = "cni"
    cni_config_dir: AbsolutePath = Path("/etc/cni/net.d")
    cni_bin_dir: AbsolutePath = Path("/usr/lib/cni")
    pod_sandbox: PodSandboxConfig = Field(default_factory=PodSandboxConfig)
    security_context: SecurityContextConfig = Field(default_factory=SecurityContextConfig)
    container: ContainerConfig = Field(default_factory=ContainerConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="before")
    @classmethod
    def _share_default_registry(cls, data: Any) -> Any:
        """Copy imageService.defaultRegistry into image before image reads its mirror list."""
        if not isinstance(data, dict):
            return data
        service_key = "imageService" if "imageService" in data else "image_service"
        image_key = "image"
        service = data.get(service_key)
        if not isinstance(service, dict):
            return data
        registry = service.get("defaultRegistry", service.get("default_registry"))
        image = data.get(image_key, {})
        if not isinstance(registry, str) or not isinstance(image, dict):
            return data
        if "defaultRegistry" in image or "default_registry" in image:
            return data
        return {**data, image_key: {**image, "defaultRegistry": registry}}

    @model_validator(mode="after")
    def _reconcile(self) -> Spec:
        for attribute, section_name, section_attribute in _PAIRED_KEYS:
            section = getattr(self, section_name)
            self._pair((self, attribute), (section, section_attribute), (section_name,))
        self._pair(
            (self.image_service, "default_registry"),
            (self.image, "default_registry"),
            ("image",),
            first_prefix="imageService.",
        )

        handlers = self.runtime.runtime_handlers
        if self.container.default_runtime not in handlers:
            raise PydanticCustomError(
                "servin_reference",
                "unknown runtime handler {value}: expected one of {names}, or a handler added "
                "under spec.runtime.runtimeHandlers",
                {
                    "value": show_value(self.container.default_runtime),
                    "names": ", ".join(handlers),
                    "path": ("container", "defaultRuntime"),
                },
            )
        return self

    @staticmethod
    def _pair(
        first: tuple[BaseModel, str],
        second: tuple[BaseModel, str],
        second_path: tuple[str, ...],
        first_prefix: str = "",
    ) -> None:
        """Make two spellings of one setting agree, copying whichever the document gave."""
        first_model, first_attribute = first
        second_model, second_attribute = second
        first_value = getattr(first_model, first_attribute)
        second_value = getattr(second_model, second_attribute)
        first_set = first_attribute in first_model.model_fields_set
        second_set = second_attribute in second_model.model_fields_set
        if first_set and second_set and first_value != second_value:
            raise _conflict(
                (*second_path, to_camel(second_attribute)),
                str(second_value),
                f"spec.{first_prefix}{to_camel(first_attribute)}",
                str(first_value),
            )
        if first_set:
            setattr(second_model, second_attribute, first_value)
        elif second_set:
            setattr(first_model, first_attribute, second_value)

    def handler_for(self, runtime_handler: str) -> HandlerInfo:
        """Return the runtime handler for a CRI runtime_handler; "" selects container.defaultRuntime."""
        return self.runtime.handler(runtime_handler or self.container.default_runtime)


class ServinCRIConfig(Section):
    """The whole configuration document (``kind: ServinCRIConfig``)."""

    api_version: Literal["v1"] = "v1"
    kind: Literal["ServinCRIConfig"] = "ServinCRIConfig"
    metadata: Metadata = Field(default_factory=Metadata)
    spec: Spec = Field(default_factory=Spec)
