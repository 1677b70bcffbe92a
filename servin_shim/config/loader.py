"""Reading, validating and writing ServinCRIConfig documents.

A document is parsed with PyYAML's safe loader (with duplicate keys rejected, because PyYAML would
otherwise keep the last one silently), then validated by the pydantic models. Any problem raises
one ConfigError that names the file.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from servin_shim.config.errors import ConfigError, config_error_from_validation, show_value
from servin_shim.config.models import ServinCRIConfig

log = logging.getLogger(__name__)

_DOCUMENT_FORM = "a mapping with apiVersion: v1, kind: ServinCRIConfig, metadata and spec"


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable keys are reported by the base class
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {show_value(key)}",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(document)"
    message = f"{source}: {where}: invalid YAML: {problem}: expected a valid YAML document"
    return ConfigError(message)


def parse_config(text: str, source: str = "<config>") -> ServinCRIConfig:
    """Parse and validate a document. The source (usually the file path) starts each error line."""
    try:
        document = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None

    if document is None:
        raise ConfigError(f"{source}: empty config document: expected {_DOCUMENT_FORM}")
    if not isinstance(document, dict):
        raise ConfigError(
            f"{source}: (document): invalid value {show_value(document)}: expected {_DOCUMENT_FORM}"
        )

    problems = [
        f"{source}: {key}: missing required key: expected {expected}"
        for key, expected in (("apiVersion", "v1"), ("kind", "ServinCRIConfig"))
        if key not in document
    ]
    try:
        config = ServinCRIConfig.model_validate(document)
    except ValidationError as exc:
        problems.extend(config_error_from_validation(exc, source, ServinCRIConfig).problems)
    if problems:
        raise ConfigError("\n".join(problems), problems)
    return config


def load_config(path: Path) -> ServinCRIConfig:
    """Read and validate the config file at path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"{path}: cannot read config file: {reason.lower()}: expected a readable YAML file, "
            "so check the --cri-config path"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid config file: {exc}: expected UTF-8 text") from None
    config = parse_config(text, str(path))
    log.debug("config loaded path=%s", path)
    return config


def default_config_text() -> str:
    """Return the packaged default document (identical to deploy/cri-config.yaml)."""
    return resources.files("servin_shim.config").joinpath("default.yaml").read_text("utf-8")


def config_to_dict(config: ServinCRIConfig) -> dict[str, Any]:
    """Return the document as plain data with camelCase keys, durations and sizes as text."""
    return config.model_dump(mode="json", by_alias=True)


def dump_config(config: ServinCRIConfig) -> str:
    """Write the document as YAML that parse_config reads back to the same values."""
    return yaml.safe_dump(
        config_to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
