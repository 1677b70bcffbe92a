"""load_settings: flags over the file, and default paths following --state-dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from servin_shim.config import ConfigError, ServinCRIConfig, load_settings

HEADER = "apiVersion: v1\nkind: ServinCRIConfig\n"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cri.yaml"
    path.write_text(HEADER + body)
    return path


def test_defaults_without_file() -> None:
    settings = load_settings(None)
    assert settings.config == ServinCRIConfig()
    assert settings.config_path is None
    assert settings.root == Path("/var/lib/servin")
    assert settings.state_dir == Path("/run/servin")
    assert settings.cri_socket == "/run/servin/servin.sock"
    assert settings.log_level == "info"
    assert settings.cri_log_level == "info"


def test_settings_is_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(AttributeError):
        settings.root = Path("/x")  # type: ignore[misc]


def test_state_dir_moves_default_paths(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=tmp_path)
    runtime = settings.config.spec.runtime
    assert settings.cri_socket == str(tmp_path / "servin.sock")
    assert settings.config.spec.cri_socket == str(tmp_path / "servin.sock")
    assert runtime.runtime_root == tmp_path / "runc"
    assert runtime.runtime_handlers["runc"].runtime_root == tmp_path / "runc"
    assert runtime.runtime_handlers["crun"].runtime_root == tmp_path / "crun"
    assert settings.config.spec.handler_for("crun").runtime_root == tmp_path / "crun"


def test_state_dir_keeps_explicit_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "spec:\n  criSocket: /run/other/cri.sock\n  runtime: {runtimeRoot: /run/other/runc}\n",
    )
    settings = load_settings(path, state_dir=tmp_path / "state")
    assert settings.cri_socket == "/run/other/cri.sock"
    assert settings.config.spec.runtime.runtime_root == Path("/run/other/runc")
    assert (
        settings.config.spec.runtime.runtime_handlers["crun"].runtime_root
        == tmp_path / "state/crun"
    )


def test_state_dir_does_not_touch_loaded_config(tmp_path: Path) -> None:
    path = write(tmp_path, "spec: {}\n")
    load_settings(path, state_dir=tmp_path / "state")
    assert load_settings(path).config.spec.runtime.runtime_root == Path("/run/servin/runc")


def test_socket_flag_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "spec:\n  criSocket: /run/other/cri.sock\n")
    settings = load_settings(path, cri_socket=str(tmp_path / "flag.sock"), state_dir=tmp_path)
    assert settings.cri_socket == str(tmp_path / "flag.sock")
    assert settings.config.spec.cri_socket == str(tmp_path / "flag.sock")


def test_file_values_used(tmp_path: Path) -> None:
    path = write(tmp_path, "spec:\n  imageService: {parallelPulls: 9}\n")
    settings = load_settings(path)
    assert settings.config_path == path
    assert settings.config.spec.image_service.parallel_pulls == 9


def test_relative_flags_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, root=Path("data"), state_dir=Path("state"))
    assert settings.root == tmp_path / "data"
    assert settings.state_dir == tmp_path / "state"


def test_log_levels() -> None:
    settings = load_settings(None, log_level="DEBUG", cri_log_level="warning")
    assert settings.log_level == "debug"
    assert settings.cri_log_level == "warning"


def test_cri_level_follows_log_level() -> None:
    assert load_settings(None, log_level="error").cri_log_level == "error"


def test_bad_log_level() -> None:
    with pytest.raises(
        ConfigError, match='^--log-level: invalid log level "loud": expected one of'
    ):
        load_settings(None, log_level="loud")


def test_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected at most 107 bytes"):
        load_settings(None, state_dir=tmp_path / ("d" * 120))


def test_bad_file_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "spec: {criPort: nope}\n")
    with pytest.raises(ConfigError, match=r"spec\.criPort"):
        load_settings(path)
