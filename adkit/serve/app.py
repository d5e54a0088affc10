"""``adkit serve``'s HTTP face (starlette on uvicorn): the routes, the token, reading request bodies. Uploads are
checked before anything is decoded: request size, content type, pixel count (read from the image header). With a
token, every request but /healthz and the page at / needs ``Authorization: Bearer TOKEN`` (compared in constant
time). The rooms behind it: service.py (models, predictions, logs, feedback), batching.py (micro-batches),
metrics.py, models.py (loading model folders, versions), feedback.py. API: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any

from adkit.serve.models import valid_name
from adkit.serve.service import Service
from adkit.serve.settings import HTTPError, Settings

log = logging.getLogger("adkit.serve")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/x-ms-bmp")


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
