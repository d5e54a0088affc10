"""The service's Prometheus metrics: requests and decisions per model, latency and inference histograms."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
