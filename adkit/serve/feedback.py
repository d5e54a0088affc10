"""Feedback from the line: a person at the line says, per decided part, that an alarm was false (``good``) or that
a part is defective (``defect``: a confirmed alarm or a missed defect). Kept append-only per product, beside the
decision logs:

    RESULTS_DIR/<product>/feedback.jsonl         one JSON line per report: time, image_sha256, label, note, image,
                                                 the model (version) it was reported to and its sha256
    RESULTS_DIR/<product>/images/<sha256>.<ext>  the image itself, when the report carried it

A report names an image by the sha256 its decision was logged with (RESULTS_DIR/<model>.jsonl); an image sent with
it must be that image. ``adkit update --from-feedback RESULTS_DIR/<product>`` adds the good-labelled images that
were kept to the model (docs/update.md)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from adkit.core import files

LABELS = ("good", "defect")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
NOTE_CHARACTERS = 2000
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}


class FeedbackError(Exception):
    """A report that cannot be taken: the HTTP status and one line naming the field and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class FeedbackStore:
    """The reports per product, and the sha256s of every image each product has decided (from the decision
    logs, read once per product and kept up to date by ``decided``)."""

    def __init__(self, results_dir: Path):
        self.results_dir = results_dir
        self.lock = threading.Lock()
        self._seen: dict[str, set[str]] = {}

    def decided(self, product: str, digests: list[str]) -> None:
        """Remember that ``product`` decided these images (called as the decisions are logged)."""
        with self.lock:
            if product in self._seen:
                self._seen[product].update(digests)

    def _decided_by(self, product: str) -> set[str]:
        with self.lock:
            if product not in self._seen:
                seen: set[str] = set()
                for log in self.results_dir.glob("*.jsonl"):
                    if log.stem == product or log.stem.startswith(product + "@"):
                        for line in log.read_text().splitlines():
                            try:
                                seen.add(json.loads(line)["image_sha256"])
                            except (ValueError, KeyError, TypeError):
                                continue  # a torn last line of a log being written
                self._seen[product] = seen
            return self._seen[product]

    def report(self, product: str, model: str, model_sha256: str, fields: dict[str, str],
               image: bytes | None, max_pixels: int) -> dict[str, Any]:
        """Check a report and store it (the image first, atomically, then the log line); nothing is written when
        it is refused. Returns the stored record."""
        from adkit.data.io import ImageReadError, ImageTooLarge, decode_image

        digest = fields.get("image_sha256", "").strip().lower()
        label = fields.get("label", "").strip().lower()
        note = fields.get("note", "")
        if not SHA256.match(digest):
            raise FeedbackError(400, "image_sha256 must be the 64 hex digits a decision returned")
        if label not in LABELS:
            raise FeedbackError(400, f"label {label!r}: use good (a false alarm) or defect (a defective part)")
        if len(note) > NOTE_CHARACTERS:
            raise FeedbackError(400, f"note of {len(note)} characters; at most {NOTE_CHARACTERS}")
        if digest not in self._decided_by(product):
            raise FeedbackError(404, f"no decision of {product} for image {digest[:12]}...: report on images the "
                                     "service scored (their image_sha256)")
        stored = None
        if image is not None:
            if hashlib.sha256(image).hexdigest() != digest:
                raise FeedbackError(400, "the image sent is not the one image_sha256 names")
            try:
                decode_image(image, "image", max_pixels)
            except ImageReadError as exc:
                raise FeedbackError(413 if isinstance(exc, ImageTooLarge) else 400, exc.message) from None
            stored = f"images/{digest}{_extension(image)}"
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_sha256": digest, "label": label,
                  "note": note, "image": stored, "model": model, "model_sha256": model_sha256}
        folder = self.results_dir / product
        with self.lock:
            if stored is not None and not (folder / stored).exists():
                (folder / "images").mkdir(parents=True, exist_ok=True)
                files.write_bytes_atomic(folder / stored, image)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "feedback.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return record


def _extension(image: bytes) -> str:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        return EXTENSIONS.get(opened.format or "", ".img")


def read_feedback(folder: Path) -> list[dict[str, Any]]:
    """The reports stored in ``folder`` (RESULTS_DIR/<product>), oldest first; the last of several reports on one
    image wins (a person may correct a report)."""
    log = folder / "feedback.jsonl"
    if not log.is_file():
        from adkit.core.errors import AdkitError

        raise AdkitError(f"{log} does not exist: --from-feedback takes RESULTS_DIR/<product> of adkit serve")
    latest: dict[str, dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        latest.pop(record.get("image_sha256"), None)
        latest[record.get("image_sha256")] = record
    return list(latest.values())
