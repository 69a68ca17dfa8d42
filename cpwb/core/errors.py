"""Error types whose messages name the file, line and field that went wrong."""
from __future__ import annotations

from pathlib import Path


class CpwbError(Exception):
    """Base class of every error cpwb raises on purpose (bad input, bad config, missing asset)."""


class InputError(CpwbError, ValueError):
    """Bad user input, located as precisely as we can: `file:line: field: message`."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        prefix += f"{field}: " if field else ""
        super().__init__(prefix + message)


class ConfigError(InputError):
    """A configuration value is missing, of the wrong type or out of range."""


class AssetError(CpwbError, RuntimeError):
    """A model or data asset cannot be found, converted or verified."""
