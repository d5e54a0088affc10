"""``adkit serve``: an inspection service for many models over HTTP (starlette on uvicorn).

Requests are queued per model and scored in micro-batches off the event loop: a batch takes every request that
queued while the previous one ran (up to ``batch_size`` images, waiting ``max_wait`` seconds for more; 0 by
default, so a lone request is scored at once); a full queue answers 503 with Retry-After. Uploads are checked
before anything is decoded: request size, content type, pixel count (read from the image header). Every decision
is appended to a JSON-lines log per model. With a token, every request but /healthz and the page at / needs
``Authorization: Bearer TOKEN`` (compared in constant time). API: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adkit.serve.feedback import FeedbackError, FeedbackStore
from adkit.serve.models import ServedModel, load_model, resolve, scan, split_version, valid_name

log = logging.getLogger("adkit.serve")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/x-ms-bmp")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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


@dataclass
class Job:
    images: torch.Tensor  # (n, 3, H, W)
    future: asyncio.Future
    queued: float = 0.0  # time.perf_counter() when submitted


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in seconds: decoding its uploads, waiting for its batch to start, the
    batch's inference (shared with the batch's other requests). Sent as a Server-Timing header."""

    decode: float = 0.0
    queue: float = 0.0
    infer: float = 0.0

    def header(self, total: float) -> str:
        parts = [("decode", self.decode), ("queue", self.queue), ("infer", self.infer), ("total", total)]
        return ", ".join(f"{name};dur={1000 * seconds:.2f}" for name, seconds in parts)


class Batcher:
    """One model's queue and the worker that scores it in micro-batches."""

    def __init__(self, model: ServedModel, settings: Settings, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.model, self.settings, self.metrics = model, settings, metrics
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=settings.queue_size)
        self.task = loop.create_task(self.work())

    def submit(self, images: torch.Tensor) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Job(images, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise HTTPError(503, f"model {self.model.name} is busy: its queue of {self.settings.queue_size} "
                                 "requests is full; retry shortly", {"Retry-After": "1"}) from None
        return future

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job is None:
                return
            jobs = [job]
            count = len(job.images)
            deadline = loop.time() + self.settings.max_wait
            while count < self.settings.batch_size:
                remaining = deadline - loop.time()
                try:
                    extra = self.queue.get_nowait() if remaining <= 0 else \
                        await asyncio.wait_for(self.queue.get(), remaining)
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if extra is None:
                    self.queue.put_nowait(None)  # stop after this batch
                    break
                jobs.append(extra)
                count += len(extra.images)
            live = [j for j in jobs if not j.future.done()]  # a request that timed out is not scored
            if not live:
                continue
            batch = torch.cat([j.images for j in live])
            started = time.perf_counter()
            try:
                maps, scores, finished = await loop.run_in_executor(None, self.timed, batch)
            except Exception as exc:  # noqa: BLE001 - a model failing on a batch fails its requests, not the service
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(HTTPError(500, f"model {self.model.name} failed: {exc}"))
                continue
            self.metrics.inference[self.model.name].observe(finished - started)
            start = 0
            for j in live:
                n = len(j.images)
                if not j.future.done():
                    timing = Timing(queue=started - j.queued, infer=finished - started)
                    j.future.set_result((maps[start:start + n], scores[start:start + n], timing))
                start += n

    def timed(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The batch's maps and scores (decisions are made per request, with its threshold), and when it ended."""
        maps, scores, _ = self.model.runner(batch, None)
        return maps, scores, time.perf_counter()

    async def stop(self) -> None:
        await self.queue.put(None)
        await self.task


@dataclass
class Histogram:
    """A Prometheus histogram: cumulative counts per bucket bound, the sum and the count."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.total += seconds
        self.count += 1

    def lines(self, name: str, model: str) -> list[str]:
        out = [f'{name}_bucket{{model="{model}",le="{bound}"}} {n}' for bound, n in zip(LATENCY_BUCKETS, self.buckets)]
        return [*out, f'{name}_bucket{{model="{model}",le="+Inf"}} {self.count}',
                f'{name}_sum{{model="{model}"}} {self.total:.6f}', f'{name}_count{{model="{model}"}} {self.count}']


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    decisions: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    latency: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    inference: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))

    def observe(self, model: str, status: int, seconds: float) -> None:
        self.requests[(model, status)] += 1
        self.latency[model].observe(seconds)

    def text(self, queues: dict[str, int]) -> str:
        lines = ["# TYPE adkit_requests_total counter"]
        lines += [f'adkit_requests_total{{model="{m}",code="{c}"}} {n}' for (m, c), n in sorted(self.requests.items())]
        lines.append("# TYPE adkit_request_seconds histogram")
        for model, histogram in sorted(self.latency.items()):
            lines += histogram.lines("adkit_request_seconds", model)
        lines.append("# HELP adkit_inference_seconds One micro-batch's inference (its count is the batches run).")
        lines.append("# TYPE adkit_inference_seconds histogram")
        for model, histogram in sorted(self.inference.items()):
            lines += histogram.lines("adkit_inference_seconds", model)
        lines.append("# TYPE adkit_queue_depth gauge")
        lines += [f'adkit_queue_depth{{model="{m}"}} {n}' for m, n in sorted(queues.items())]
        lines.append("# TYPE adkit_decisions_total counter")
        lines += [f'adkit_decisions_total{{model="{m}",decision="{d}"}} {n}'
                  for (m, d), n in sorted(self.decisions.items())]
        return "\n".join(lines) + "\n"


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
                      overlay: bool) -> dict[str, Any]:
        from adkit.core.errors import AdkitError
        from adkit.data.io import ImageReadError, ImageTooLarge, decode_image
        from adkit.outputs import artifacts
        from adkit.stats.thresholds import decide

        model = self.model(name)
        if not uploads:
            raise HTTPError(400, "no image: send multipart field 'image' (repeatable) or an image body")
        try:
            decision = artifacts.chosen_threshold(model.decision, policy, f"model {name}")
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


# served without the token: the health check, and the page, which holds no data and sends the token the user
# types to the API routes (so a browser can open it at all)
PUBLIC_ROUTES = ("healthz", "page")


def create_app(settings: Settings):
    """The starlette application."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from adkit.serve.page import PAGE

    service = Service(settings)

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPError(401, "missing or wrong token: send Authorization: Bearer TOKEN",
                            {"WWW-Authenticate": "Bearer"})

    def handled(route_name: str):
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                started = time.perf_counter()
                model = request.path_params.get("name", route_name)
                try:
                    if route_name not in PUBLIC_ROUTES:
                        authorised(request)
                    response = await handler(request)
                except HTTPError as exc:
                    response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
                except Exception as exc:
                    log.exception("%s failed", request.url.path)
                    response = JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
                if route_name == "predict":
                    service.metrics.observe(model if valid_name(model) else "-", response.status_code,
                                            time.perf_counter() - started)
                return response
            return endpoint
        return wrap

    @handled("healthz")
    async def healthz(request: Request) -> Response:
        status = 200 if service.ready else 503
        return JSONResponse({"status": "ok" if service.ready else "starting", "models": len(service.models)},
                            status_code=status)

    @handled("metrics")
    async def metrics(request: Request) -> Response:
        queues = {name: m.batcher.queue.qsize() for name, m in service.models.items()}
        return PlainTextResponse(service.metrics.text(queues), media_type="text/plain; version=0.0.4")

    @handled("models")
    async def models(request: Request) -> Response:
        return JSONResponse({"models": service.cards()})

    @handled("feedback")
    async def feedback(request: Request) -> Response:
        name = request.path_params["name"]
        service.model(name)  # 400 / 404 before reading the body
        body = await read_body(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image = None
        if content_type == "application/json":
            try:
                fields = json.loads(body)
            except ValueError:
                raise HTTPError(400, "the body is not JSON") from None
            if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
                raise HTTPError(400, "send a JSON object of strings: image_sha256, label and an optional note")
        elif content_type == "multipart/form-data":
            fields, uploads = await read_form(request, body)
            if len(uploads) > 1:
                raise HTTPError(400, "one image per report")
            image = uploads[0][1] if uploads else None
        else:
            raise HTTPError(415, f"content type {content_type or 'none'!r}: send application/json, or "
                                 "multipart/form-data with image_sha256, label, note and the image")
        record = await asyncio.get_running_loop().run_in_executor(None, service.feedback, name, fields, image)
        return JSONResponse({"stored": record}, status_code=201)

    @handled("predict")
    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        service.model(name)  # 400 / 404 before reading the body
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request)
        uploads = await read_uploads(request, content_type, body)
        params = request.query_params
        overlay = params.get("overlay", "").lower() in ("1", "true", "yes")
        answer, timing = await service.predict(name, uploads, params.get("threshold"), overlay)
        return JSONResponse(answer, headers={"Server-Timing": timing.header(time.perf_counter() - started)})

    async def read_body(request: Request) -> bytes:
        """The request body, refused with 413 beyond the limit (by its declared length before reading it)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            raise HTTPError(413, f"request of {int(length):,} bytes; at most {settings.max_request_bytes:,}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_request_bytes:
                raise HTTPError(413, f"request over {settings.max_request_bytes:,} bytes")
        return body

    async def read_form(request: Request, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
        """A multipart body's text fields and its files in the field 'image'."""
        from starlette.datastructures import UploadFile

        form_request = Request(request.scope, receive=_receiver(body))
        try:
            form = await form_request.form(max_files=64, max_fields=64, max_part_size=settings.max_request_bytes)
        except Exception as exc:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise HTTPError(400, f"malformed multipart body ({type(exc).__name__})") from None
        fields = {key: item for key, item in form.multi_items() if isinstance(item, str)}
        files = [item for key, item in form.multi_items() if key == "image"]
        if not all(isinstance(f, UploadFile) for f in files):
            raise HTTPError(400, "the field 'image' must be a file")
        return fields, [(f.filename or "image", await f.read()) for f in files]

    async def read_uploads(request: Request, content_type: str, body: bytes) -> list[tuple[str, bytes]]:
        if content_type == "multipart/form-data":
            _, files = await read_form(request, body)
            if not files:
                raise HTTPError(400, "multipart body without a file field 'image'")
            return files
        if content_type in IMAGE_TYPES:
            return [(request.query_params.get("name", "image"), body)]
        raise HTTPError(415, f"content type {content_type or 'none'!r}: send multipart/form-data with field "
                             f"'image', or a body of type {', '.join(IMAGE_TYPES[:4])}")

    @handled("page")
    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(routes=[
        Route("/", page), Route("/healthz", healthz), Route("/metrics", metrics), Route("/v1/models", models),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/feedback", feedback, methods=["POST"]),
    ], lifespan=lifespan)
    app.state.service = service
    return app


def _receiver(body: bytes):
    """An ASGI receive callable that replays an already-read body."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
