"""``servin-shim image``: image store commands that run without the daemon.

``image import FILE`` loads an OCI image layout archive or a ``docker save`` archive into the
image store under ``--root``. The store keeps image records in SQLite (WAL mode) and writes
blobs and snapshots under temporary names before renaming them, so an import may run while the
daemon runs: the daemon's ListImages and ImageStatus see the imported images at once. A
RemoveImage in the daemon during the import may still delete blobs of a layer that the import
shares with the removed image, so avoid removing images while importing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from servin_shim.config import ConfigError, load_settings
from servin_shim.errors import ServinError

log = logging.getLogger(__name__)

EXIT_IMPORT_ERROR = 1
EXIT_CONFIG_ERROR = 2

app = typer.Typer(help="Manage the image store without the daemon.", no_args_is_help=True)


@app.command("import")
def import_command(
    ctx: typer.Context,
    archive: Annotated[
        Path,
        typer.Argument(
            help="OCI image layout archive (tar) or docker save archive to import.",
            exists=True,
            dir_okay=False,
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Directory for persistent data whose image store receives the images. "
            "Default: the --root given before the subcommand, else /var/lib/servin.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    cri_config: Annotated[
        Path | None,
        typer.Option(
            "--cri-config",
            help="ServinCRIConfig YAML file; its spec.image.defaultRegistry completes short "
            "image names. Default: the built-in defaults.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Import the images of ARCHIVE and print one line per image: id and names."""
    parent: dict[str, Any] = ctx.obj if isinstance(ctx.obj, dict) else {}
    try:
        settings = load_settings(
            cri_config or parent.get("config_path"),
            root=root or parent.get("root"),
            state_dir=parent.get("state_dir"),
        )
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    try:
        imported = asyncio.run(_import(settings.root, archive, settings))
    except ServinError as exc:
        typer.echo(f"import of {archive} failed: {exc}", err=True)
        raise typer.Exit(EXIT_IMPORT_ERROR) from None
    for image in imported:
        typer.echo(f"{image.id} {' '.join(image.names)}".rstrip())


async def _import(root: Path, archive: Path, settings: Any) -> list[Any]:
    # Imported here so that the rest of the command line loads without the image modules.
    from servin_shim.images.archive import import_archive
    from servin_shim.images.service import ImageService
    from servin_shim.state.db import Database

    db = Database(root / "servin.db")
    try:
        service = ImageService(
            root,
            db,
            default_registry=settings.config.spec.image.default_registry,
            # A daemon may be running on this root, so its partial downloads stay.
            clean_partial=False,
        )
        return await import_archive(service, archive)
    finally:
        db.close()
