"""Prometheus metrics in the text exposition format: requests, tokens and latencies per model
(base or adapter), queue depth and running requests."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.histograms: dict[tuple[str, tuple], list[float]] = {}  # bucket counts, then sum, then count

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            h = self.histograms.setdefault(key, [0.0] * (len(BUCKETS) + 2))
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(
        self,
        gauges: dict[str, float],
        totals: dict[str, float] | None = None,
        visible: Callable[[str], bool] | None = None,
        shared: bool = True,
    ) -> str:
        """The exposition text; gauges and totals (counters kept elsewhere) are rendered unlabelled. Series of a
        model for which visible(model) is false are left out (a tenant sees its own models only), and without
        shared the series of no model (the whole server's traffic)."""

        def fmt(labels: tuple, extra: str = "") -> str:
            parts = [f'{k}="{v}"' for k, v in labels] + ([extra] if extra else [])
            return "{" + ",".join(parts) + "}" if parts else ""

        def shown(labels: tuple) -> bool:
            models = [v for k, v in labels if k == "model"]
            return (shared or bool(models)) and (visible is None or all(visible(v) for v in models))

        lines = []
        with self.lock:
            counters = {key: v for key, v in self.counters.items() if shown(key[1])}
            histograms = {key: h for key, h in self.histograms.items() if shown(key[1])}
            for name in sorted({n for n, _ in counters}):
                lines.append(f"# TYPE {name} counter")
                lines += [f"{name}{fmt(lb)} {v:g}" for (n, lb), v in sorted(counters.items()) if n == name]
            for name in sorted({n for n, _ in histograms}):
                lines.append(f"# TYPE {name} histogram")
                for (n, lb), h in sorted(histograms.items()):
                    if n != name:
                        continue
                    for edge, c in zip(BUCKETS, h):
                        le = "+Inf" if edge == float("inf") else f"{edge:g}"
                        bucket = 'le="' + le + '"'
                        lines.append(f"{name}_bucket{fmt(lb, bucket)} {c:g}")
                    lines += [f"{name}_sum{fmt(lb)} {h[-2]:g}", f"{name}_count{fmt(lb)} {h[-1]:g}"]
        for kind, values in (("gauge", gauges), ("counter", totals or {})) if shared else ():
            for name, value in values.items():
                lines += [f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
