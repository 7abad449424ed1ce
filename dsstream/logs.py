"""Structured logging: every record of a session carries its session id."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["configure_logging", "session_logger"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session = getattr(record, "session", None)
        if session:
            out["session"] = session
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session", None)
        record.session_tag = f" [{session}]" if session else ""
        return super().format(record)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr as text lines or JSON lines (``fmt="json"``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)s %(name)s%(session_tag)s: %(message)s")
        )
    root = logging.getLogger("dsstream")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def session_logger(name: str, session_id: str) -> logging.LoggerAdapter:
    """A logger whose records carry ``session`` (shown by both formats)."""
    return logging.LoggerAdapter(logging.getLogger(name), {"session": session_id})
