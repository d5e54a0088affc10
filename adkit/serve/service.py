"""The service behind the routes: the models (scanned, loaded, swapped in as their folders change; versions of a
product), their batchers, predictions with their decisions, the decision log and the line's feedback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from adkit.serve.batching import Batcher, Timing
from adkit.serve.feedback import FeedbackError, FeedbackStore
from adkit.serve.metrics import Metrics
from adkit.serve.models import ServedModel, load_model, resolve, scan, split_version, valid_name
from adkit.serve.settings import HTTPError, Settings

log = logging.getLogger("adkit.serve")


class Service:
    """The models, their batchers, the results logs and the metrics behind the HTTP routes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.metrics = Metrics()
        self.log_lock = threading.Lock()
        self.feedback_store = FeedbackStore(settings.results_dir)
        self.ready = False
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self.ready = True
        self._watcher = asyncio.get_running_loop().create_task(self.watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for model in list(self.models.values()):
            await model.batcher.stop()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("scanning %s failed", self.settings.models_dir)

    async def refresh(self) -> None:
        """Load new and changed model folders, drop removed ones; a folder that fails to load keeps the model
        that was there (a copy in progress is read again at the next scan)."""
        from adkit.serve.models import signature

        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, scan, self.settings.models_dir)
        for name, folder in found.items():
            current = self.models.get(name)
            if current is not None and current.signature == signature(folder):
                continue
            try:
                model = await loop.run_in_executor(None, load_model, folder)
            except Exception as exc:  # noqa: BLE001 - reported, and the old model keeps serving
                log.warning("model %s not loaded: %s", name, exc)
                continue
            model.batcher = Batcher(model, self.settings, loop, self.metrics)
            self.models[name] = model  # new requests go to the new model; queued ones finish on the old
            if current is not None:
                loop.create_task(current.batcher.stop())
            log.info("serving %s (%s)", name, model.sha256[:12])
        for name in [n for n in self.models if n not in found]:
            old = self.models.pop(name)
            loop.create_task(old.batcher.stop())

    def model(self, name: str) -> ServedModel:
        """The model a request names: a version (``tiles@2``) or a product's current version (``tiles``)."""
        if not valid_name(name):
            raise HTTPError(400, f"{name!r} is not a model name (letters, digits, '_', '.', '-', and @N for a version)")
        model = resolve(self.models, name)
        if model is None:
            raise HTTPError(404, f"no model {name!r}; GET /v1/models lists them")
        return model

    def cards(self) -> list[dict[str, Any]]:
        """Every served version's card, each saying whether it is its product's current one."""
        return [m.public_card(current=resolve(self.models, split_version(m.name)[0]) is m)
                for m in self.models.values()]

    def feedback(self, name: str, fields: dict[str, str], image: bytes | None) -> dict[str, Any]:
        """Store a report from the line on one of ``name``'s decisions (adkit.serve.feedback)."""
        model = self.model(name)
        try:
            return self.feedback_store.report(split_version(model.name)[0], model.name, model.sha256, fields, image,
                                              self.settings.max_pixels)
        except FeedbackError as exc:
            raise HTTPError(exc.status, exc.message) from None

    async def predict(self, name: str, uploads: list[tuple[str, bytes]], policy: str | None,
                      overlay: bool) -> tuple[dict[str, Any], Timing]:
        """Score the uploads with ``name``'s model and decide: the answer (model, results) and where the time went."""
        from adkit.core.errors import AdkitError
        from adkit.data.io import ImageReadError, ImageTooLarge, decode_image
        from adkit.stats.decisions import chosen_threshold
        from adkit.stats.thresholds import decide

        model = self.model(name)
        if not uploads:
            raise HTTPError(400, "no image: send multipart field 'image' (repeatable) or an image body")
        try:
            decision = chosen_threshold(model.decision, policy, f"model {name}")
        except AdkitError as exc:
            raise HTTPError(400, exc.message) from None
        def prepare() -> tuple[list[torch.Tensor], list[Any]]:
            images, placements = [], []
            for filename, data in uploads:
                try:
                    tensor = decode_image(data, filename, self.settings.max_pixels)
                except ImageReadError as exc:
                    raise HTTPError(413 if isinstance(exc, ImageTooLarge) else 400, exc.message) from None
                image, placement = model.geometry.to_input(tensor)
                images.append(image)
                placements.append(placement)
            return images, placements

        # decoding and resizing off the event loop, beside the inference of earlier requests
        began = time.perf_counter()
        images, placements = await asyncio.get_running_loop().run_in_executor(None, prepare)
        decoded = time.perf_counter() - began
        future = model.batcher.submit(torch.stack(images))
        try:
            maps, scores, timing = await asyncio.wait_for(future, self.settings.timeout)
        except TimeoutError:
            raise HTTPError(504, f"model {name} took longer than {self.settings.timeout:g} s") from None
        threshold = None if decision is None else float(decision["threshold"])
        decisions = decide(scores, threshold)
        results = []
        for i, (filename, data) in enumerate(uploads):
            flagged = bool(decisions[i]) if threshold is not None else None
            row = {"name": filename, "score": float(scores[i]), "decision": flagged, "threshold": threshold,
                   "policy": None if decision is None else decision.get("policy"),
                   "image_sha256": hashlib.sha256(data).hexdigest()}
            if flagged is not None:
                self.metrics.decisions[(name, "anomalous" if flagged else "normal")] += 1
            if overlay:
                row["overlay_png"] = overlay_png(images[i], maps[i], placements[i], model)
            results.append(row)
        self.append_log(model, results)
        return {"model": model.name, "model_sha256": model.sha256, "results": results}, replace(timing, decode=decoded)

    def append_log(self, model: ServedModel, results: list[dict[str, Any]]) -> None:
        folder = self.settings.results_dir
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        lines = "".join(json.dumps({"time": stamp, "image_sha256": r["image_sha256"], "score": r["score"],
                                    "decision": r["decision"], "threshold": r["threshold"], "policy": r["policy"],
                                    "model_sha256": model.sha256}) + "\n" for r in results)
        with self.log_lock, open(folder / f"{model.name}.jsonl", "a") as handle:
            handle.write(lines)
        self.feedback_store.decided(split_version(model.name)[0], [r["image_sha256"] for r in results])


def overlay_png(image: torch.Tensor, anomaly_map: torch.Tensor, placement: Any, model: ServedModel) -> str:
    """The heatmap over the image at its own size, as a base64 PNG."""
    from adkit.outputs.report import overlay_panel

    own = model.geometry.to_original(anomaly_map, placement)
    picture = model.geometry.to_original(image, placement)
    values = own.float()
    panel = overlay_panel(picture, values, float(np.quantile(values.numpy(), 0.99)), float(values.max()))
    buffer = io.BytesIO()
    panel.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
