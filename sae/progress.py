"""A periodic progress line with throughput and ETA, for long stages (stderr, no dependencies)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts work units (tokens) and prints `[stage] pct done | rate | ETA | extras` lines."""

    def __init__(
        self,
        stage: str,
        total: int | None,
        unit: str = "tok",
        every_seconds: float = 2.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.every_seconds = every_seconds
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = 0.0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int, **extras: float | str) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last_print >= self.every_seconds:
            self._last_print = now
            self._print(extras)

    def close(self, **extras: float | str) -> None:
        self._print(extras, final=True)

    def _print(self, extras: dict[str, float | str], final: bool = False) -> None:
        rate = self.rate()
        if self.total:
            pct = 100.0 * self.done / self.total
            parts = [
                f"[{self.stage}] {pct:.1f}% {_human(self.done)}/{_human(self.total)} {self.unit}"
            ]
        else:
            parts = [f"[{self.stage}] {_human(self.done)} {self.unit}"]
        parts.append(f"{_human(rate)} {self.unit}/s")
        if final:
            parts.append(f"took {_clock(time.perf_counter() - self.start)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        for key, value in extras.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print(" | ".join(parts), file=self.stream, flush=True)


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
