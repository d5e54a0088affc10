"""``adkit serve``: many models behind one HTTP service (adkit.serve.app), hot-reloaded from a folder
(adkit.serve.models). Needs the ``serve`` extra: pip install 'adkit[serve]'."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from adkit.core.errors import AdkitError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AdkitError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if len(token) < 16:
        raise AdkitError(f"--token-file {path}: the token must be at least 16 characters")
    return token


def quiet_openmp() -> None:
    """Let torch's OpenMP threads stop spinning soon after a parallel region ends, unless the user chose otherwise.

    The service decodes and resizes each upload with torch in one thread and runs the model in another. libgomp's
    threads spin for about 300,000 rounds (milliseconds) after each region, so the decoding thread's team took the
    cores onnxruntime needed next: 3.5-5 ms more per image on 2 cores. 10,000 rounds remove that and leave torch's
    own inference (checkpoints) as fast as before within the noise, where sleeping at once
    (OMP_WAIT_POLICY=PASSIVE) made it 25 % slower (docs/benchmarks.md). libgomp reads this when torch loads: it
    must be set before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


def serve(models_dir: Path, host: str, port: int, token_file: Path | None, results_dir: Path | None, **options) -> None:
    """Run the service until interrupted."""
    quiet_openmp()
    try:
        import uvicorn

        from adkit.serve.app import create_app
        from adkit.serve.settings import Settings
    except ImportError:
        raise AdkitError("adkit serve needs starlette, uvicorn and python-multipart: pip install 'adkit[serve]'") from None
    if not models_dir.is_dir():
        raise AdkitError(f"{models_dir} is not a folder: give the folder holding one folder per model")
    token = read_token(token_file)
    if token is None and not is_loopback(host):
        raise AdkitError(f"--host {host} is not a loopback address: give --token-file FILE so that requests need a "
                         "token")
    settings = Settings(models_dir=models_dir, results_dir=results_dir or models_dir.parent / "serve-results",
                        token=token, **options)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
