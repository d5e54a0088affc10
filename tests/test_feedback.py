"""Feedback from the line, on a real loopback server: a report on a decided part under the token, bad reports
answered with one 4xx line each and nothing written, the page's buttons in headless Chromium, and the whole loop:
predict -> "false alarm" -> adkit update --from-feedback -> the new version served -> the same part passes, with
no request failing while the new version comes in."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import shutil
import threading
import time
import uuid

import pytest
from PIL import Image
from test_serve import AUTH, TOKEN, Server, request

pytest.importorskip("starlette")

DATA = "synthetic:size=32,n_train=10,n_test=6"


def form(fields: dict[str, str], image: bytes | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    if image is not None:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"part.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def part_png(category: str = "wood", index: int = 0) -> bytes:
    """A 32 px synthetic texture as PNG bytes: a wood part is a false alarm waiting to happen for a tile model."""
    from adkit.data.textures import normal_image

    array = (normal_image(category, 32, 9, "test", index).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path):
    """A models folder with one PatchCore checkpoint, 'parts', of the tiny tiles, and a server on it."""
    from adkit.serve.settings import Settings
    from adkit.testing import invoke

    code, _, err = invoke("run", "--detector", "patchcore:coreset=0.25", "--data", DATA, "--category", "tile",
                          "--image-size", "32", "--out", str(tmp_path / "run"))
    assert code == 0, err
    models = tmp_path / "models"
    shutil.copytree(tmp_path / "run" / "tile", models / "parts", ignore=shutil.ignore_patterns("test", "*.png"))
    server = Server(Settings(models_dir=models, results_dir=tmp_path / "results", token=TOKEN,
                             max_request_bytes=1 << 20, reload_interval=0.2))
    yield server, models, tmp_path / "results"
    server.stop()


def predict(server, image: bytes, name: str = "parts") -> dict:
    status, _, body = request(server.url(f"/v1/models/{name}/predict"), image, {**AUTH, "Content-Type": "image/png"})
    assert status == 200, body
    return json.loads(body)


def test_a_report_is_stored_under_the_token_and_bad_ones_write_nothing(served):
    server, _, results = served
    image = part_png()
    digest = predict(server, image)["results"][0]["image_sha256"]
    assert digest == hashlib.sha256(image).hexdigest()
    url = server.url("/v1/models/parts/feedback")
    body = json.dumps({"image_sha256": digest, "label": "good", "note": "lighting changed"}).encode()
    assert request(url, body, {"Content-Type": "application/json"})[0] == 401
    status, _, answer = request(url, body, {**AUTH, "Content-Type": "application/json"})
    assert status == 201 and json.loads(answer)["stored"]["label"] == "good"
    data, kind = form({"image_sha256": digest, "label": "defect"}, image)
    status, _, answer = request(url, data, {**AUTH, "Content-Type": kind})
    assert status == 201, answer
    stored = results / "parts" / json.loads(answer)["stored"]["image"]
    assert stored.read_bytes() == image
    log = results / "parts" / "feedback.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(line)["label"] for line in lines] == ["good", "defect"]
    other = hashlib.sha256(b"never scored").hexdigest()
    cases = [
        (json.dumps({"image_sha256": other, "label": "good"}).encode(), "application/json", 404, "no decision of parts"),
        (json.dumps({"image_sha256": digest, "label": "fine"}).encode(), "application/json", 400, "label 'fine'"),
        (json.dumps({"image_sha256": "abc", "label": "good"}).encode(), "application/json", 400, "64 hex digits"),
        (b"{not json", "application/json", 400, "not JSON"),
        (*form({"image_sha256": digest, "label": "good"}, part_png("tile")), 400, "not the one image_sha256 names"),
        (b"image_sha256=x", "text/plain", 415, "content type"),
    ]
    for data, kind, status_expected, needle in cases:
        status, _, answer = request(url, data, {**AUTH, "Content-Type": kind})
        assert status == status_expected and needle in json.loads(answer)["error"], (needle, answer)
    # an oversized report is refused from its declared length, before the body is read
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/models/parts/feedback")
    for key, value in {**AUTH, "Content-Type": form({})[1], "Content-Length": str(2 << 20)}.items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most 1,048,576" in json.loads(response.read())["error"]
    connection.close()
    status, _, answer = request(server.url("/v1/models/nothing/feedback"), body,
                                {**AUTH, "Content-Type": "application/json"})
    assert status == 404 and "no model 'nothing'" in json.loads(answer)["error"]
    assert log.read_text().splitlines() == lines  # nothing written by a refused report
    assert sorted(p.name for p in (results / "parts" / "images").iterdir()) == [stored.name]
    assert request(server.url("/healthz"))[0] == 200  # and the service keeps serving


def test_a_false_alarm_reported_comes_back_as_a_model_that_passes_the_part(served):
    from adkit.testing import invoke

    server, models, results = served
    image = part_png()
    first = predict(server, image)["results"][0]
    assert first["decision"] is True  # a wood part at a tile station: a false alarm for this line
    data, kind = form({"image_sha256": first["image_sha256"], "label": "good"}, image)
    assert request(server.url("/v1/models/parts/feedback"), data, {**AUTH, "Content-Type": kind})[0] == 201
    failures, stop = [], threading.Event()

    def line() -> None:  # parts keep coming while the new version is made and swapped in
        while not stop.is_set():
            status, _, body = request(server.url("/v1/models/parts/predict"), part_png("tile", 3),
                                      {**AUTH, "Content-Type": "image/png"})
            if status != 200:
                failures.append((status, body))

    worker = threading.Thread(target=line)
    worker.start()
    try:
        code, _, err = invoke("update", "--checkpoint", str(models / "parts" / "checkpoint.pt"), "--from-feedback",
                              str(results / "parts"))
        assert code == 0, err
        assert (models / "parts@2" / "checkpoint.pt").is_file()
        deadline = time.time() + 60
        while True:
            _, _, body = request(server.url("/v1/models"), headers=AUTH)
            cards = {c["name"]: c for c in json.loads(body)["models"]}
            if "parts@2" in cards or time.time() > deadline:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert cards["parts@2"]["current"] and not cards["parts"]["current"] and cards["parts@2"]["version"] == 2
    assert cards["parts@2"]["lineage"][0]["from_feedback"] == str(results / "parts")
    again = predict(server, image)
    assert again["model"] == "parts@2" and again["results"][0]["decision"] is False  # the same part now passes
    assert predict(server, image, "parts@1")["results"][0]["decision"] is True  # the old version, by name


def test_the_page_reports_a_false_alarm_in_chromium(served, tmp_path):
    from adkit.outputs.screenshots import find_browser

    executable = find_browser()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt install chromium); .ci/run installs it when it can")
    from browser import Browser

    server, _, results = served
    path = tmp_path / "part.png"
    path.write_bytes(part_png())
    browser = Browser(executable)
    try:
        browser.open(server.url("/"))
        browser.evaluate(f"const t = document.getElementById('token'); t.value = {TOKEN!r}; "
                         "t.dispatchEvent(new Event('change'))")
        browser.wait_for("document.querySelectorAll('#model option').length === 1")
        browser.set_files("#files", [path])
        browser.wait_for("document.querySelector('.report') !== null")
        browser.evaluate("document.querySelector('.report[data-label=good]').click()")
        browser.wait_for("document.querySelector('.reported').textContent.includes('reported')")
        text = browser.evaluate("document.querySelector('.reported').textContent")
    finally:
        browser.close()
    assert "reported: good" in text
    record = json.loads((results / "parts" / "feedback.jsonl").read_text().splitlines()[0])
    assert record["label"] == "good" and (results / "parts" / record["image"]).read_bytes() == path.read_bytes()


def test_versions_resolve_to_the_highest_unless_named():
    from adkit.serve.models import resolve, split_version, valid_name

    class Model:
        def __init__(self, name):
            self.name = name

    models = {n: Model(n) for n in ("tiles", "tiles@3", "tiles@12", "bolts")}
    assert resolve(models, "tiles").name == "tiles@12" and resolve(models, "tiles@1").name == "tiles"
    assert resolve(models, "tiles@3").name == "tiles@3" and resolve(models, "tiles@2") is None
    assert resolve(models, "bolts").name == "bolts" and resolve(models, "nuts") is None
    assert split_version("tiles@12") == ("tiles", 12) and split_version("a.b") == ("a.b", 1)
    assert valid_name("tiles@2") and not valid_name("tiles@x") and not valid_name("../tiles@2")
