"""ConfigError and the translation of pydantic validation errors into operator-facing messages.

Every problem in a configuration document becomes one line of the form
``<file>: <key path>: <what is wrong with which value>: expected <form>``, where the key path uses
the document's own camelCase spelling (``spec.imageService.pullTimeout``). All problems found in
one document are raised together as a single ConfigError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from servin_shim.errors import InvalidArgument

log = logging.getLogger(__name__)

_MAX_SHOWN = 60

# Human names for the JSON-ish types that YAML produces, used in "wrong type" messages.
_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}

# Expected forms for pydantic's built-in error types. Our own error types carry a full message.
_EXPECTED: dict[str, str] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string (quote values that YAML would read as numbers or booleans)",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a path",
}


class ConfigError(InvalidArgument):
    """A configuration file or flag is invalid; the message lists every problem, one per line."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: The individual problem lines, each already prefixed with the file name.
        self.problems: list[str] = list(problems) or [message]


def show_value(value: object) -> str:
    """Render a value the way it would appear in YAML, quoted if it is a string, shortened."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def format_path(loc: Iterable[int | str]) -> str:
    """Join a pydantic error location into ``spec.image.registryMirrors["docker.io"]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text or "(document)"


def _allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str] | None:
    """Walk the model classes along loc and return the keys the innermost model accepts."""
    current: Any = model
    for part in loc:
        origin = get_origin(current)
        if origin is Annotated:
            current = get_args(current)[0]
            origin = get_origin(current)
        if origin in (dict, list):
            # A free-form level such as a handler name or a list index: step to the value type.
            current = get_args(current)[-1]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next(
            (f for name, f in current.model_fields.items() if part in (name, f.alias)), None
        )
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return None


def describe_error(error: ErrorDetails, model: type[BaseModel]) -> tuple[str, str]:
    """Return (key path, message) for one pydantic error in the document's own spelling."""
    loc: list[int | str] = list(error["loc"])
    ctx = error.get("ctx") or {}
    extra_path = ctx.get("path")
    if extra_path:
        # Cross-field checks run on the enclosing model, so they name the key they mean.
        loc.extend(extra_path)
    path = format_path(loc)
    kind = error["type"]
    value = error.get("input")

    if kind == "extra_forbidden":
        key = loc[-1] if loc else ""
        allowed = _allowed_keys(model, loc[:-1])
        expected = f"one of {', '.join(allowed)}" if allowed else "a known key"
        return path, f"unknown key {show_value(key)}: expected {expected}"
    if kind == "missing":
        return path, "missing required key: expected a value for it"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
        return path, f"invalid value {show_value(value)}: expected {expected}"
    if kind in _EXPECTED:
        if value is None:
            return path, f"missing value (null): expected {_EXPECTED[kind]}"
        got = _TYPE_NAMES.get(type(value), type(value).__name__)
        return path, f"invalid value {show_value(value)} ({got}): expected {_EXPECTED[kind]}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = next(iter(ctx.values()), "")
        operator = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        return path, f"invalid value {show_value(value)}: expected a value {operator} {bound}"
    if kind == "value_error":
        # Raised by a plain ValueError in a validator; strip pydantic's "Value error, " prefix.
        message = error["msg"].removeprefix("Value error, ")
        return path, message
    if kind.startswith("servin_"):
        # Our own validators already word the message as "invalid <what> <value>: expected ...".
        return path, error["msg"]
    return path, f"invalid value {show_value(value)}: {error['msg'].lower()}"


def config_error_from_validation(
    exc: ValidationError, source: str, model: type[BaseModel]
) -> ConfigError:
    """Build one ConfigError listing every problem of a failed validation."""
    problems = []
    for error in exc.errors(include_url=False):
        path, message = describe_error(error, model)
        problems.append(f"{source}: {path}: {message}")
    return ConfigError("\n".join(problems), problems)
