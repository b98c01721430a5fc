"""Operator log setup (loguru), and nothing else.

Named ``log.py`` so it is not confused with the stdlib ``logging``. The sink is
synchronous and cheap (stderr); the request path never logs per chunk.
Hypercorn's own messages (stdlib logging) are routed here too.
"""

from __future__ import annotations

import logging
import sys

from loguru import logger

FORMAT = "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _to_stderr(message: str) -> None:
    sys.stderr.write(message)


def setup(level: str = "INFO", *, tag: str = "") -> None:
    """Log to stderr; ``tag`` names the process on each line (a worker of ``serve --workers``)."""
    logger.remove()
    fmt = FORMAT.replace("{message}", f"[{tag}] {{message}}") if tag else FORMAT
    # A function sink looks sys.stderr up at each write, so a replaced stderr (pytest) is followed.
    logger.add(_to_stderr, level=level.upper(), format=fmt, backtrace=False, diagnose=False, colorize=sys.stderr.isatty())
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
