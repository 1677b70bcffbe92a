"""The ServinCRIConfig configuration document and the effective daemon settings.

Typical use::

    from servin_shim.config import load_settings
    settings = load_settings(Path("/etc/servin/cri.yaml"), state_dir=Path("/tmp/servin-state"))
    handler = settings.config.spec.handler_for("")   # the default runtime handler
"""

from __future__ import annotations

from servin_shim.config.errors import ConfigError
from servin_shim.config.loader import (
    config_to_dict,
    default_config_text,
    dump_config,
    load_config,
    parse_config,
)
from servin_shim.config.models import (
    BUILTIN_RUNTIME_ENGINES,
    DEFAULT_CRI_SOCKET,
    DEFAULT_STATE_DIR,
    ContainerConfig,
    HandlerInfo,
    ImageConfig,
    ImageServiceConfig,
    Metadata,
    NetworkConfig,
    PodSandboxConfig,
    RegistryMirror,
    ResourcesConfig,
    RuntimeConfig,
    RuntimeHandler,
    SecurityConfig,
    SecurityContextConfig,
    ServinCRIConfig,
    Spec,
    TcpAddress,
)
from servin_shim.config.settings import DEFAULT_ROOT, LOG_LEVELS, Settings, load_settings
from servin_shim.config.units import (
    ByteSize,
    Duration,
    MicrosecondDuration,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "BUILTIN_RUNTIME_ENGINES",
    "DEFAULT_CRI_SOCKET",
    "DEFAULT_ROOT",
    "DEFAULT_STATE_DIR",
    "LOG_LEVELS",
    "ByteSize",
    "ConfigError",
    "ContainerConfig",
    "Duration",
    "HandlerInfo",
    "ImageConfig",
    "ImageServiceConfig",
    "Metadata",
    "MicrosecondDuration",
    "NetworkConfig",
    "PodSandboxConfig",
    "RegistryMirror",
    "ResourcesConfig",
    "RuntimeConfig",
    "RuntimeHandler",
    "SecurityConfig",
    "SecurityContextConfig",
    "ServinCRIConfig",
    "Settings",
    "Spec",
    "TcpAddress",
    "config_to_dict",
    "default_config_text",
    "dump_config",
    "format_duration",
    "format_size",
    "load_config",
    "load_settings",
    "parse_config",
    "parse_duration",
    "parse_size",
]
