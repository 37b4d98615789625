"""The `epmoe` logger hierarchy.

Library modules log through `get_logger(__name__)` (loggers "epmoe.layer", "epmoe.ep", ...) and never print. The
package logger has a NullHandler, so nothing shows unless the application configures logging, e.g.
`logging.basicConfig(level=logging.INFO)` or `epmoe._logging.configure("INFO")`. Messages logged while
torch.distributed is initialised start with "[rank r/R] " (the global rank), so the lines of several ranks that
share a terminal or a log collector can be told apart; each record also carries `rank` and `world_size`
attributes (-1 / 0 outside torch.distributed).
"""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist

PACKAGE = "epmoe"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logging.getLogger(PACKAGE).addHandler(logging.NullHandler())


def rank_info() -> tuple[int, int]:
    """(global rank, world size) when torch.distributed is initialised, else (-1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return -1, 0


def rank_prefix() -> str:
    """"[rank r/R] " under torch.distributed, "" otherwise."""
    rank, world_size = rank_info()
    return f"[rank {rank}/{world_size}] " if world_size else ""


class _RankAdapter(logging.LoggerAdapter):
    """Prefixes every message with the rank (see the module docstring) and adds rank/world_size to the record."""

    def process(self, msg, kwargs):
        rank, world_size = rank_info()
        kwargs["extra"] = {**kwargs.get("extra", {}), "rank": rank, "world_size": world_size}
        return (f"[rank {rank}/{world_size}] {msg}" if world_size else msg), kwargs


def get_logger(name: str) -> logging.LoggerAdapter:
    """The rank-prefixing logger for a module of the package (`get_logger(__name__)`)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        name = f"{PACKAGE}.{name}"
    return _RankAdapter(logging.getLogger(name), {})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the object it was when installed)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure(level: int | str = logging.INFO, stream=None) -> logging.Handler:
    """Sends the package's records at `level` and above to `stream` (default: the current sys.stderr) in
    `FORMAT`; for applications and the `epmoe` command. Calling it again replaces the handler it installed before;
    `unconfigure(handler)` removes it."""
    logger = logging.getLogger(PACKAGE)
    for handler in list(logger.handlers):
        if getattr(handler, "_epmoe_cli", False):
            logger.removeHandler(handler)
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler._epmoe_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def unconfigure(handler: logging.Handler) -> None:
    """Undoes `configure`: removes its handler and resets the package logger's level."""
    logger = logging.getLogger(PACKAGE)
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
