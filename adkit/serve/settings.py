"""What the service is started with, and the one error its parts raise: an HTTP status and one line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    models_dir: Path
    results_dir: Path
    token: str | None = None
    batch_size: int = 8
    max_wait: float = 0.0
    queue_size: int = 64
    max_request_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    timeout: float = 30.0
    reload_interval: float = 1.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
