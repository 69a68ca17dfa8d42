"""What a number was made with: a short hash of settings, the code's git commit and the package versions.

No torch import here (the core stays light): versions come from the installed distributions' metadata.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_PATHS = ("cpwb", "configs", "notebooks", "pyproject.toml")  # what results depend on (not docs, not outputs)


def digest(obj: Any, length: int = 16) -> str:
    """A short, stable SHA-256 of a JSON-able object (keys sorted; anything else by its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checkout's commit, `+dirty` when its code, configs or notebooks differ from it; "" outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on, the code's git commit included."""
    import cpwb

    return {"python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
            "cpwb": cpwb.__version__, "git": git_commit()}
