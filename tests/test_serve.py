"""adkit serve: the real server on a loopback port; every endpoint, the token, 503 on a full queue, a model
replaced while requests run, and bad uploads answered with a 4xx and one line while the server keeps serving."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

TOKEN = "s3cret-token-for-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving create_app(settings) in a thread."""

    def __init__(self, settings):
        import uvicorn

        from adkit.serve.app import create_app

        self.port = free_port()
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def multipart(files: list[tuple[str, bytes]], field: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(size=(32, 32), colour=(120, 110, 100)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder: an ONNX export and a checkpoint of pixel-gauss on the tiny tiles."""
    from adkit.testing import invoke

    root = tmp_path_factory.mktemp("serve")
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "synthetic:size=32,n_train=8,n_test=6",
                          "--category", "tile", "--image-size", "32", "--out", str(root / "run"))
    assert code == 0, err
    folder = root / "models"
    folder.mkdir()
    code, _, err = invoke("export", "--checkpoint", str(root / "run" / "tile" / "checkpoint.pt"), "--format", "onnx",
                          "--out", str(folder / "tiles-onnx"))
    assert code == 0, err
    shutil.copytree(root / "run" / "tile", folder / "tiles-ckpt", ignore=shutil.ignore_patterns("test", "*.png"))
    return folder


@pytest.fixture
def server(models, tmp_path):
    from adkit.serve.settings import Settings

    running = Server(Settings(models_dir=models, results_dir=tmp_path / "results", token=TOKEN, queue_size=4,
                              max_request_bytes=1 << 20, max_pixels=4_000_000, reload_interval=0.2))
    yield running
    running.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_every_endpoint_with_the_token(server, tmp_path):
    status, _, body = request(server.url("/healthz"))  # no token needed
    assert status == 200 and json.loads(body)["models"] == 2
    assert request(server.url("/v1/models"))[0] == 401
    assert request(server.url("/v1/models"), headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, body = request(server.url("/v1/models"), headers=AUTH)
    cards = {m["name"]: m for m in json.loads(body)["models"]}
    assert status == 200 and set(cards) == {"tiles-onnx", "tiles-ckpt"}
    assert cards["tiles-onnx"]["threshold_policy"] == "fpr:0.01" and cards["tiles-onnx"]["input"]["width"] == 32
    data, kind = multipart([("a.png", png()), ("b.png", png(colour=(250, 10, 10)))])
    results = {}
    for name in cards:
        status, _, body = request(server.url(f"/v1/models/{name}/predict?overlay=1"), data,
                                  {**AUTH, "Content-Type": kind})
        assert status == 200, body
        answer = json.loads(body)
        assert [r["name"] for r in answer["results"]] == ["a.png", "b.png"]
        results[name] = answer["results"]
        assert Image.open(io.BytesIO(__import__("base64").b64decode(answer["results"][0]["overlay_png"]))).width > 0
    for a, b in zip(results["tiles-onnx"], results["tiles-ckpt"]):  # the export and its checkpoint agree
        assert a["score"] == pytest.approx(b["score"], rel=1e-4) and a["threshold"] == b["threshold"]
    assert results["tiles-onnx"][1]["score"] > results["tiles-onnx"][0]["score"]  # a red square is not a tile
    # a raw image body, and a threshold override per request
    status, headers, body = request(server.url("/v1/models/tiles-onnx/predict?threshold=value:0"), png(),
                                    {**AUTH, "Content-Type": "image/png"})
    assert status == 200 and json.loads(body)["results"][0]["decision"] is True
    # where the time went, as a Server-Timing header: each part at least 0 and none longer than the whole
    timing = {key.lower(): value for key, value in headers.items()}["server-timing"]
    parts = dict(item.split(";dur=") for item in timing.split(", "))
    assert list(parts) == ["decode", "queue", "infer", "total"]
    durations = {name: float(value) for name, value in parts.items()}
    assert min(durations.values()) >= 0  # each rounded to 0.01 ms, so their sum may pass the total by 0.015 ms
    assert durations["decode"] + durations["queue"] + durations["infer"] <= durations["total"] + 0.02
    status, _, body = request(server.url("/metrics"), headers=AUTH)
    text = body.decode()
    assert 'adkit_requests_total{model="tiles-onnx",code="200"} 2' in text and "adkit_request_seconds_bucket" in text
    assert 'adkit_decisions_total{model="tiles-onnx"' in text and "adkit_queue_depth" in text
    # one batch per request here (they came one at a time); the two-image request was one batch
    assert 'adkit_inference_seconds_count{model="tiles-onnx"} 2' in text
    assert 'adkit_inference_seconds_bucket{model="tiles-onnx",le="+Inf"} 2' in text
    status, headers, body = request(server.url("/"))  # the page needs no token: it sends the one typed into it
    assert status == 200 and b"<select id=\"model\">" in body
    assert {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/html")
    log = [json.loads(line) for line in (tmp_path / "results" / "tiles-onnx.jsonl").read_text().splitlines()]
    assert len(log) == 3 and {"image_sha256", "score", "decision", "threshold", "model_sha256", "time"} <= set(log[0])


@pytest.mark.parametrize("path,body,content_type,status,needle", [
    ("/v1/models/tiles-onnx/predict", png()[:60], "image/png", 400, "not a readable image"),
    ("/v1/models/tiles-onnx/predict", b"hello, world", "text/plain", 415, "content type 'text/plain'"),
    ("/v1/models/tiles-onnx/predict", b"", "image/png", 400, "empty upload"),
    ("/v1/models/nothing/predict", png(), "image/png", 404, "no model 'nothing'"),
    ("/v1/models/..%2F..%2Fetc/predict", png(), "image/png", 400, "is not a model name"),
    ("/v1/models/tiles-onnx/predict?threshold=fpr:2", png(), "image/png", 400, "strictly between 0 and 1"),
])
def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, path, body, content_type,
                                                                           status, needle):
    got, _, answer = request(server.url(path), body, {**AUTH, "Content-Type": content_type}, method="POST")
    assert got in (status, 404 if "%2F" in path else status), answer
    if got == status:
        message = json.loads(answer)["error"]
        assert needle in message and "\n" not in message
    assert request(server.url("/v1/models/tiles-onnx/predict"), png(), {**AUTH, "Content-Type": "image/png"})[0] == 200


def test_a_huge_image_header_and_a_huge_body_are_refused_before_decoding(server):
    header = io.BytesIO()
    Image.new("L", (20000, 20000)).save(header, format="PNG")  # 400 MP of zeros: a small file
    status, _, answer = request(server.url("/v1/models/tiles-onnx/predict"), header.getvalue(),
                                {**AUTH, "Content-Type": "image/png"})
    assert status == 413 and "the 4,000,000 pixels allowed" in json.loads(answer)["error"]
    big = io.BytesIO()
    Image.new("L", (2500, 2000)).save(big, format="PNG")  # 5 MP: under PIL's limit, over the service's
    status, _, answer = request(server.url("/v1/models/tiles-onnx/predict"), big.getvalue(),
                                {**AUTH, "Content-Type": "image/png"})
    assert status == 413 and "2500x2000 px is more than the 4,000,000 pixels allowed" in json.loads(answer)["error"]
    # a declared length over the limit is refused from the headers, before the body is read
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/models/tiles-onnx/predict")
    for key, value in {**AUTH, "Content-Type": "image/png", "Content-Length": str(2 << 20)}.items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most 1,048,576" in json.loads(response.read())["error"]
    connection.close()
    # a body sent in chunks, without a length, is cut off once it passes the limit
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"0" * (64 << 10) for _ in range(17))  # just over 1 MiB: the last chunk crosses the limit
    connection.request("POST", "/v1/models/tiles-onnx/predict", body=chunks, encode_chunked=True,
                       headers={**AUTH, "Content-Type": "image/png"})
    response = connection.getresponse()
    assert response.status == 413 and "request over 1,048,576 bytes" in json.loads(response.read())["error"]
    connection.close()


def test_a_full_queue_answers_503_with_retry_after(server):
    service = server.app.state.service
    model = service.models["tiles-onnx"]
    slow = model.runner

    def sluggish(images, threshold):
        time.sleep(0.5)
        return slow(images, threshold)

    model.runner = sluggish
    try:
        # 24 at once: a batch of 8 runs for 0.5 s, 4 wait in the queue, the rest find it full
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: request(server.url("/v1/models/tiles-onnx/predict"), png(),
                                                      {**AUTH, "Content-Type": "image/png"}), range(24)))
    finally:
        model.runner = slow
    codes = [status for status, _, _ in answers]
    assert 503 in codes and 200 in codes
    assert all(headers.get("retry-after") == "1" or headers.get("Retry-After") == "1"
               for status, headers, _ in answers if status == 503)


def test_a_model_replaced_while_requests_run_fails_none(server, models, tmp_path):
    staging = models.parent / "staging-copy"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(models / "tiles-onnx", staging)

    def ask(_):
        return request(server.url("/v1/models/tiles-onnx/predict"), png(), {**AUTH, "Content-Type": "image/png"})[0]

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(ask, i) for i in range(30)]
        time.sleep(0.1)
        old = models / "tiles-onnx"
        aside = models.parent / "old-tiles-onnx"
        old.rename(aside)  # replace the folder: out, then the new one in (two renames)
        staging.rename(old)
        (old / "model.json").touch()
        codes = [f.result() for f in running]
    shutil.rmtree(aside)
    assert all(code in (200, 503) for code in codes) and codes.count(200) >= 10, codes
    time.sleep(0.6)  # the next scan picks the new folder up
    assert ask(0) == 200


def test_serve_refuses_unsafe_or_impossible_settings_in_one_line(invoke, models, tmp_path):
    code, _, err = invoke("serve", str(models), "--host", "0.0.0.0")
    assert code == 2 and "is not a loopback address: give --token-file FILE" in err
    short = tmp_path / "token"
    short.write_text("abc")
    code, _, err = invoke("serve", str(models), "--token-file", str(short))
    assert code == 2 and "at least 16 characters" in err
    code, _, err = invoke("serve", str(tmp_path / "missing"))
    assert code == 2 and "is not a folder" in err


def test_a_model_is_warmed_up_on_its_input_shape_before_it_serves(models):
    from adkit.serve import models as served

    calls = []
    model = served.load_model(models / "tiles-onnx")
    real = model.runner
    model.runner = lambda images, threshold: calls.append((tuple(images.shape), threshold)) or real(images, threshold)
    assert served.warmed(model) is model
    assert calls == [((1, 3, 32, 32), None)] * served.WARM_UP_ROUNDS


def test_serve_shortens_openmp_spinning_before_torch_loads(tmp_path):
    """libgomp reads GOMP_SPINCOUNT when torch loads, so `adkit serve` must set it before anything imports torch;
    a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    import os
    import subprocess
    import sys

    script = ("import os, sys\n"
              "import adkit.serve as s\n"
              "seen = []\n"
              "quiet = s.quiet_openmp\n"
              "def watched():\n"
              "    seen.append('torch' in sys.modules)\n"
              "    quiet()\n"
              "def start(*args, **kwargs):\n"  # stops before uvicorn starts
              "    seen.append(os.environ.get('GOMP_SPINCOUNT'))\n"
              "    raise SystemExit(0)\n"
              "s.quiet_openmp, s.read_token = watched, start\n"
              "from adkit.cli import main\n"
              "try:\n"
              f"    main(['serve', {str(tmp_path)!r}])\n"
              "finally:\n"
              "    print(seen)\n")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cases = (({}, "10000"), ({"GOMP_SPINCOUNT": "500"}, "500"), ({"OMP_WAIT_POLICY": "active"}, None))
    for extra, expected in cases:
        done = subprocess.run([sys.executable, "-c", script], env={**base, **extra}, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.stdout.strip() == str([False, expected]), done.stderr


def test_the_page_scores_an_uploaded_image_in_chromium(models, tmp_path):
    from browser import Browser

    from adkit.outputs.screenshots import find_browser
    from adkit.serve.settings import Settings

    executable = find_browser()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt install chromium); .ci/run installs it when it can")
    running = Server(Settings(models_dir=models, results_dir=tmp_path / "results", token=TOKEN))
    image = tmp_path / "part.png"
    image.write_bytes(png(colour=(250, 10, 10)))
    browser = Browser(executable)
    try:
        browser.open(running.url("/"))  # the page opens without the token; the API answers 401 until it is typed
        browser.wait_for("document.getElementById('card').textContent.includes('token')")
        assert browser.evaluate("document.querySelectorAll('#model option').length") == 0
        browser.evaluate(f"const t = document.getElementById('token'); t.value = {TOKEN!r}; "
                         "t.dispatchEvent(new Event('change'))")
        browser.wait_for("document.querySelectorAll('#model option').length === 2")
        browser.evaluate("document.getElementById('model').value = 'tiles-onnx'")
        browser.set_files("#files", [image])
        browser.wait_for("document.querySelector('.result') !== null")
        text = browser.evaluate("document.querySelector('.result').innerText")
        assert "part.png" in text and "score" in text and ("anomalous" in text or "normal" in text)
        assert browser.evaluate("document.querySelector('.result img').naturalWidth") > 0
        browser.screenshot(tmp_path / "page.png")
    finally:
        browser.close()
        running.stop()
    assert (tmp_path / "page.png").stat().st_size > 1000
