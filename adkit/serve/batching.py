"""Micro-batching: each model's queue and the worker that scores it off the event loop. A batch takes every request
that queued while the previous one ran (up to ``batch_size`` images, waiting ``max_wait`` seconds for more; 0 by
default, so a lone request is scored at once); a full queue answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from adkit.serve.metrics import Metrics
from adkit.serve.models import ServedModel
from adkit.serve.settings import HTTPError, Settings


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
