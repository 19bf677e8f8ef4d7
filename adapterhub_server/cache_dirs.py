"""Where AdapterHub keeps per-user caches (converted models, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(env_var: str, leaf: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/adapterhub/<leaf>``, else
    ``~/.cache/adapterhub/<leaf>``; read at call time so that tests and the CLI can set it."""
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "adapterhub" / leaf
