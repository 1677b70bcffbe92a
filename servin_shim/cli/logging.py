"""Logging setup for the servin-shim process: one stderr handler on the root logger."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CRI_LOGGER = "servin_shim.cri"
# hpack logs every HTTP/2 header at debug, which includes registry and kubelet credentials.
_SECRET_LEAKING_LOGGERS = ("hpack",)
_HANDLER_MARK = "_servin_shim_handler"


def configure_logging(level: str, cri_level: str | None = None) -> None:
    """Send log records to stderr; level sets the root logger, cri_level servin_shim.cri.

    Levels are names such as "debug" or "INFO". Calling it again replaces the handler that the
    previous call installed and leaves handlers added by others (pytest, for example) in place.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())

    logging.getLogger(CRI_LOGGER).setLevel((cri_level or level).upper())
    for name in _SECRET_LEAKING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    log.debug("logging configured level=%s cri_level=%s", level, cri_level or level)
