"""Where adkit keeps what it makes once and reuses: ``ADKIT_CACHE``, else ~/.cache/adkit."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ADKIT_CACHE", Path.home() / ".cache" / "adkit"))
