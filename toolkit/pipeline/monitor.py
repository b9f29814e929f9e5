"""Wall time and peak resident memory of a block, sampled on a thread (per step, not per process)."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


class Measure:
    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __enter__(self) -> Measure:
        self.peak_rss = self._proc.memory_info().rss
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._start
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def record(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 3), "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
