"""``JITKERN_LOG=INFO`` (or DEBUG, WARNING...) sends jitkern's log to stderr at that level."""

from __future__ import annotations

import logging

from . import settings


def configure() -> None:
    level = settings.log_level()
    logger = logging.getLogger("jitkern")
    if not level:
        return
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"JITKERN_LOG={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    logger.setLevel(level.upper())
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(h)
