"""Pictures of report pages: a headless Chromium found on the PATH renders a page to a PNG (``adkit report
--screenshot``)."""

from __future__ import annotations

from pathlib import Path

from adkit.core.errors import AdkitError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """A headless-capable Chromium on the PATH, or None."""
    import shutil

    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1800) -> float:
    """Render ``page`` in headless Chromium and save the top ``width`` x ``height`` px to ``png``; returns the
    seconds it took (browser start included)."""
    import subprocess
    import time

    browser = find_browser()
    if browser is None:
        raise AdkitError("--screenshot needs Chromium on the PATH (Debian: apt install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                             f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0 or not png.is_file():
        raise AdkitError(f"{browser} could not render {page}: {result.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started
