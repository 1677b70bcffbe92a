"""The servin-shim command line: start the daemon, show the effective configuration, print the version.

``servin-shim [flags]`` starts the daemon. Subcommands live in typer sub-apps (``config``) so that
later groups such as ``image`` register the same way. A ConfigError exits with status 2 and its
message on stderr, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from servin_shim import CRI_API_VERSION, RUNTIME_NAME, __version__
from servin_shim.cli.image import app as image_app
from servin_shim.cli.logging import configure_logging
from servin_shim.config import (
    ConfigError,
    Settings,
    default_config_text,
    dump_config,
    load_settings,
)

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2

CriConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--cri-config",
        help="ServinCRIConfig YAML file. Without it the built-in defaults apply "
        "(see `servin-shim config default`).",
        dir_okay=False,
        show_default=False,
    ),
]
CriSocketOption = Annotated[
    str | None,
    typer.Option(
        "--cri-socket",
        help="Unix socket path for the CRI gRPC server; overrides spec.criSocket. "
        "Default: spec.criSocket, which is <state-dir>/servin.sock unless the config sets it.",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        help="Level of the root logger: debug, info, warning or error. Default: info.",
        show_default=False,
    ),
]
CriLogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--cri-log-level",
        help="Level of the servin_shim.cri logger, which logs each RPC at debug. "
        "Default: the --log-level value.",
        show_default=False,
    ),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Directory for persistent data (images, metadata). Default: /var/lib/servin.",
        file_okay=False,
        show_default=False,
    ),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Directory for volatile state (sockets, runtime roots). Default paths of the config "
        "under /run/servin move here. Default: /run/servin.",
        file_okay=False,
        show_default=False,
    ),
]

app = typer.Typer(
    name="servin-shim",
    help="A Kubernetes CRI runtime that runs pods with runc or crun. "
    "Without a subcommand it starts the daemon.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
)
config_app = typer.Typer(help="Inspect the daemon configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(image_app, name="image")


def _merge_flags(ctx: typer.Context, **given: Any) -> dict[str, Any]:
    """Combine flags given before the subcommand (stored in ctx.obj) with the subcommand's own."""
    merged: dict[str, Any] = dict(ctx.obj or {}) if isinstance(ctx.obj, dict) else {}
    merged.update({key: value for key, value in given.items() if value is not None})
    return merged


def _settings_or_exit(flags: dict[str, Any]) -> Settings:
    """Load the settings, or print the ConfigError message and exit with status 2."""
    try:
        return load_settings(
            flags.get("config_path"),
            cri_socket=flags.get("cri_socket"),
            log_level=flags.get("log_level"),
            cri_log_level=flags.get("cri_log_level"),
            root=flags.get("root"),
            state_dir=flags.get("state_dir"),
        )
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    cri_config: CriConfigOption = None,
    cri_socket: CriSocketOption = None,
    log_level: LogLevelOption = None,
    cri_log_level: CriLogLevelOption = None,
    root: RootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Start the servin-shim daemon, or run a subcommand with these flags."""
    flags = _merge_flags(
        ctx,
        config_path=cri_config,
        cri_socket=cri_socket,
        log_level=log_level,
        cri_log_level=cri_log_level,
        root=root,
        state_dir=state_dir,
    )
    if ctx.invoked_subcommand is not None:
        ctx.obj = flags
        return

    settings = _settings_or_exit(flags)
    configure_logging(settings.log_level, settings.cri_log_level)
    log.info(
        "servin-shim starting version=%s config=%s cri_socket=%s root=%s state_dir=%s",
        __version__,
        settings.config_path or "built-in defaults",
        settings.cri_socket,
        settings.root,
        settings.state_dir,
    )
    # Imported here so that `config show` and `version` work without the daemon's dependencies.
    daemon = importlib.import_module("servin_shim.daemon")
    code: int = daemon.run(settings)
    raise typer.Exit(code)


def render_settings(settings: Settings) -> str:
    """Return the effective settings as comment lines followed by the effective document."""
    header = [
        "# effective servin-shim settings",
        f"# configFile: {settings.config_path or 'built-in defaults'}",
        f"# root: {settings.root}",
        f"# stateDir: {settings.state_dir}",
        f"# criSocket: {settings.cri_socket}",
        f"# logLevel: {settings.log_level}",
        f"# criLogLevel: {settings.cri_log_level}",
    ]
    return "\n".join(header) + "\n" + dump_config(settings.config)


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    cri_config: CriConfigOption = None,
    cri_socket: CriSocketOption = None,
    log_level: LogLevelOption = None,
    cri_log_level: CriLogLevelOption = None,
    root: RootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Print the configuration the daemon would use with these flags, as YAML."""
    flags = _merge_flags(
        ctx,
        config_path=cri_config,
        cri_socket=cri_socket,
        log_level=log_level,
        cri_log_level=cri_log_level,
        root=root,
        state_dir=state_dir,
    )
    settings = _settings_or_exit(flags)
    typer.echo(render_settings(settings), nl=False)


@config_app.command("default")
def config_default() -> None:
    """Print the built-in default config file, a starting point for --cri-config."""
    typer.echo(default_config_text(), nl=False)


@app.command("version")
def version() -> None:
    """Print the servin-shim version and the CRI API version it serves."""
    typer.echo(f"{RUNTIME_NAME} {__version__} (CRI API {CRI_API_VERSION})")


def main() -> None:
    """Run the servin-shim command line (console script entry point)."""
    app()
