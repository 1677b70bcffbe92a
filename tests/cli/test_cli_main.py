"""The servin-shim command line, through typer's CliRunner and the installed console script."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from servin_shim import __version__
from servin_shim.cli.logging import configure_logging
from servin_shim.cli.main import app
from servin_shim.config import Settings, default_config_text, parse_config

HEADER = "apiVersion: v1\nkind: ServinCRIConfig\n"
BAD_BODY = "spec:\n  imageService: {pullTimeout: 5 minutes}\n"
CONSOLE_SCRIPT = Path(sys.executable).parent / "servin-shim"

runner = CliRunner()


def comments(output: str) -> dict[str, str]:
    """Return the "# key: value" header lines of `config show` as a dict."""
    pairs = {}
    for line in output.splitlines():
        if line.startswith("# ") and ": " in line:
            key, _, value = line[2:].partition(": ")
            pairs[key] = value
    return pairs


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cri.yaml"
    path.write_text(HEADER + body)
    return path


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging so that later tests see the logging setup pytest made."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cri_level = logging.getLogger("servin_shim.cri").level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("servin_shim.cri").setLevel(cri_level)


def test_config_show_defaults(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0
    header = comments(result.stdout)
    assert header["configFile"] == "built-in defaults"
    assert header["root"] == "/var/lib/servin"
    assert header["stateDir"] == str(tmp_path)
    assert header["criSocket"] == str(tmp_path / "servin.sock")


def test_config_show_output_reloads(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--state-dir", str(tmp_path)])
    config = parse_config(result.stdout, "shown")
    assert config.spec.runtime.runtime_root == tmp_path / "runc"
    assert config.spec.cri_socket == str(tmp_path / "servin.sock")


def test_config_show_file_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "spec:\n  imageService: {pullTimeout: 90s}\n  criPort: 10010\n")
    socket = tmp_path / "flag.sock"
    args = [
        "config",
        "show",
        "--cri-config",
        str(path),
        "--cri-socket",
        str(socket),
        "--root",
        str(tmp_path / "data"),
        "--log-level",
        "debug",
        "--cri-log-level",
        "warning",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    header = comments(result.stdout)
    document = yaml.safe_load(result.stdout)
    assert header["configFile"] == str(path)
    assert header["root"] == str(tmp_path / "data")
    assert header["criSocket"] == str(socket)
    assert header["logLevel"] == "debug"
    assert header["criLogLevel"] == "warning"
    assert document["spec"]["criSocket"] == str(socket)
    assert document["spec"]["imageService"]["pullTimeout"] == "1m30s"
    assert document["spec"]["criPort"] == "127.0.0.1:10010"


def test_flags_before_subcommand(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--state-dir", str(tmp_path), "config", "show"])
    assert result.exit_code == 0
    assert comments(result.stdout)["stateDir"] == str(tmp_path)


def test_subcommand_flag_wins(tmp_path: Path) -> None:
    args = ["--root", "/srv/a", "config", "show", "--root", str(tmp_path)]
    result = runner.invoke(app, args)
    assert comments(result.stdout)["root"] == str(tmp_path)


def test_config_show_bad_file_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_BODY)
    result = runner.invoke(app, ["config", "show", "--cri-config", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"{path}: spec.imageService.pullTimeout: invalid duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_default_prints_default_yaml() -> None:
    result = runner.invoke(app, ["config", "default"])
    assert result.exit_code == 0
    assert result.stdout == default_config_text()


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_daemon_receives_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    # servin_shim.daemon is the lead's module; this records the call to check the CLI wiring.
    received: list[Settings] = []
    fake = types.ModuleType("servin_shim.daemon")
    fake.run = lambda settings: received.append(settings) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "servin_shim.daemon", fake)
    path = write(tmp_path, "spec: {imageService: {parallelPulls: 4}}\n")
    args = ["--cri-config", str(path), "--state-dir", str(tmp_path), "--cri-log-level", "debug"]
    result = runner.invoke(app, args)
    assert result.exit_code == 7
    assert len(received) == 1
    assert received[0].config.spec.image_service.parallel_pulls == 4
    assert received[0].state_dir == tmp_path
    assert received[0].cri_log_level == "debug"
    assert logging.getLogger("servin_shim.cri").level == logging.DEBUG


def test_daemon_not_started_on_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("servin_shim.daemon")
    fake.run = lambda settings: pytest.fail("daemon started with a bad config")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "servin_shim.daemon", fake)
    result = runner.invoke(app, ["--cri-config", str(write(tmp_path, BAD_BODY))])
    assert result.exit_code == 2
    assert "spec.imageService.pullTimeout" in result.stderr


def test_configure_logging_levels(restore_logging: None) -> None:
    configure_logging("warning", "debug")
    configure_logging("error", "info")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_servin_shim_handler", False)]
    assert len(ours) == 1
    assert root.level == logging.ERROR
    assert logging.getLogger("servin_shim.cri").level == logging.INFO


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_script_config_show(tmp_path: Path) -> None:
    path = write(tmp_path, "spec:\n  container: {logMaxSize: 512Ki}\n")
    result = run_script("config", "show", "--cri-config", str(path), "--state-dir", str(tmp_path))
    assert result.returncode == 0
    document = yaml.safe_load(result.stdout)
    assert comments(result.stdout)["criSocket"] == str(tmp_path / "servin.sock")
    assert document["spec"]["container"]["logMaxSize"] == "512Ki"
    assert document["spec"]["runtime"]["runtimeRoot"] == str(tmp_path / "runc")


def test_script_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_BODY)
    result = run_script("--cri-config", str(path), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: spec.imageService.pullTimeout:")
    assert "Traceback" not in result.stderr


def test_script_yaml_error_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "cri.yaml"
    path.write_text("apiVersion: v1\nkind: [\n")
    result = run_script("config", "show", "--cri-config", str(path))
    assert result.returncode == 2
    assert "line 3, column 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_script_version() -> None:
    result = run_script("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"servin-shim {__version__} (CRI API v1)"
