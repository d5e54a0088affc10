"""Load on `adkit serve` from this machine (loopback only, bounded in requests and time): requests/s and p50/p99
latency at several concurrencies, against scoring the same images offline with the same exported model, and the
server process's resident memory across the run.

    python benchmarks/serve_load.py MODELS_DIR MODEL IMAGE_DIR [--requests 200] [--concurrency 1,8,32]

The server is `adkit serve` in a process of its own (its resident memory is read from /proc after each row); the
client sends from threads of this process, one connection per request (--keep-alive: one per thread). Offline: the model's runner on the same
images, decoding included, batch 8 (what `adkit predict --model` does after loading). With --soak N, N more
requests at concurrency 8 follow, and the server's memory is read every 1,000. Prints one JSON line per row:
the client's latency (p50/p90/p99/max), and from each answer's Server-Timing header the server's inference
(infer_*) and the rest of the latency (rest_* = client - infer; decode_*, handler_* = the server's other work
with the wait for a batch, outside_* = HTTP and the client).

On a machine with cores to spare (Linux), --server-cores and --client-cores pin the server and this process to
separate cores (lists such as 0,1 or 2-15), so the client's threads do not take the server's cores:

    python benchmarks/serve_load.py models padim-onnx images/ --server-cores 0,1 --client-cores 2-15
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from test_serve import free_port, request

from adkit.data.io import decode_image
from adkit.serve.models import load_model


def cores(text: str) -> set[int]:
    """CPU numbers from a list such as ``0,1`` or ``2-15,20``."""
    chosen: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return chosen


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


_connections = threading.local()


def kept_alive(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST over this thread's open connection (opened on first use, and again after an error)."""
    parts = urllib.parse.urlsplit(url)
    connection = getattr(_connections, "connection", None)
    if connection is None:
        connection = _connections.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", parts.path, body, headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except (OSError, http.client.HTTPException):
        connection.close()
        _connections.connection = None
        raise


def percentiles(seconds: list[float], prefix: str) -> dict[str, float]:
    """p50, p90, p99 and the maximum in ms (the p-th percentile: the value at rank p/100 * (n - 1))."""
    ordered = sorted(seconds)
    if not ordered:
        return {}
    at = {f"p{p}": ordered[int(p / 100 * (len(ordered) - 1))] for p in (50, 90, 99)}
    at["max"] = ordered[-1]
    return {f"{prefix}{name}_ms": round(1000 * value, 1) for name, value in at.items()}


def server_timing(headers: dict[str, str], client: float) -> dict[str, float]:
    """The Server-Timing header's parts in seconds, and the client's latency ({} without the header)."""
    text = {key.lower(): value for key, value in headers.items()}.get("server-timing")
    if not text:
        return {}
    parts = {name: float(value) / 1000 for name, value in (item.split(";dur=") for item in text.split(", "))}
    return {**parts, "client": client}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("model")
    parser.add_argument("images", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--max-wait", type=float, default=0.0)
    parser.add_argument("--soak", type=int, default=0)
    parser.add_argument("--keep-alive", action="store_true", help="each client thread keeps one connection open (as "
                                                                   "a line's client would) instead of one per request")
    parser.add_argument("--server-cores", type=cores, help="the server's CPUs, e.g. 0,1 (Linux)")
    parser.add_argument("--client-cores", type=cores, help="this process's CPUs, e.g. 2-15 (Linux)")
    args = parser.parse_args()
    server_cores = args.server_cores
    if args.client_cores:
        os.sched_setaffinity(0, args.client_cores)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    bodies = [(p.name, p.read_bytes()) for p in paths]
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
    port = free_port()
    adkit = Path(sys.executable).parent / "adkit"
    server = subprocess.Popen([str(adkit), "serve", str(args.models_dir), "--port", str(port), "--results",
                               str(args.models_dir.parent / "serve-load-results"), "--batch-size",
                               str(args.batch_size), "--max-wait", str(args.max_wait), "--queue-size", "1024"])
    if server_cores:  # at once, while it imports: the threads it starts later take its cores
        os.sched_setaffinity(server.pid, server_cores)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if request(base + "/healthz")[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            server.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    url = f"{base}/v1/models/{args.model}/predict"
    started_rss = rss_mb(server.pid)
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            latencies: list[float] = []
            timings: list[dict[str, float]] = []

            def one(i: int, latencies: list[float] = latencies, timings: list[dict[str, float]] = timings) -> int:
                name, body = bodies[i % len(bodies)]
                begin = time.perf_counter()
                send = kept_alive if args.keep_alive else request
                status, headers, _ = send(url, body, {"Content-Type": kinds[Path(name).suffix.lower()]})
                latencies.append(time.perf_counter() - begin)
                timings.append(server_timing(headers, latencies[-1]))
                return status

            begin = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                statuses = list(pool.map(one, range(args.requests)))
            seconds = time.perf_counter() - begin
            print(json.dumps({"concurrency": concurrency, "requests": args.requests,
                              "ok": statuses.count(200), "requests_s": round(args.requests / seconds, 1),
                              **percentiles(latencies, ""),
                              # the server's own account (Server-Timing): its batches' inference, and the rest
                              # of the request's time at the client (HTTP, decoding, queue, thread hops)
                              **percentiles([t["infer"] for t in timings if t], "infer_"),
                              **percentiles([t["client"] - t["infer"] for t in timings if t], "rest_"),
                              **percentiles([t["decode"] for t in timings if t], "decode_"),
                              **percentiles([t["total"] - t["infer"] - t["decode"] for t in timings if t],
                                            "handler_"),
                              **percentiles([t["client"] - t["total"] for t in timings if t], "outside_"),
                              "server_rss_mb": round(rss_mb(server.pid))}), flush=True)
            if time.perf_counter() - begin > args.max_seconds:
                break
        model = load_model(args.models_dir / args.model)

        def decoded(i: int) -> torch.Tensor:
            name, body = bodies[i % len(bodies)]
            return model.geometry.to_input(decode_image(body, name, 10**9))[0]

        images = torch.stack([decoded(i) for i in range(len(bodies))])  # load_model has warmed the runner up
        begin = time.perf_counter()
        done = 0
        while done < args.requests:  # decoding included, as the service decodes every upload
            batch = torch.stack([decoded(done + j) for j in range(args.batch_size)])
            model.runner(batch, None)
            done += len(batch)
        offline = done / (time.perf_counter() - begin)
        singles = []
        for i in range(100):
            begin = time.perf_counter()
            model.runner(images[i % len(images):][:1], None)
            singles.append(time.perf_counter() - begin)
        print(json.dumps({"offline_img_s_batch": round(offline, 1), "batch": args.batch_size,
                          "one_image_ms": round(1000 * statistics.mean(singles), 1),
                          "one_image_median_ms": round(1000 * statistics.median(singles), 1),
                          "one_image_p99_ms": round(1000 * sorted(singles)[98], 1)}), flush=True)
        if args.soak:
            readings = [round(rss_mb(server.pid))]
            with ThreadPoolExecutor(8) as pool:
                for start in range(0, args.soak, 1000):
                    statuses = list(pool.map(lambda i: request(url, bodies[i % len(bodies)][1],
                                                               {"Content-Type": "image/jpeg"})[0],
                                             range(start, min(start + 1000, args.soak))))
                    assert set(statuses) == {200}, set(statuses)
                    readings.append(round(rss_mb(server.pid)))
            print(json.dumps({"soak_requests": args.soak, "server_rss_mb_every_1000": readings}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"server_rss_mb_start": round(started_rss),
                      "server_cores": sorted(server_cores) if server_cores else None,
                      "client_cores": sorted(args.client_cores) if args.client_cores else None}), flush=True)


if __name__ == "__main__":
    main()
