"""Peak memory of one stage, for its manifest: this host's resident set (Linux's high-water
mark, reset when the stage starts, so stages run in one process are told apart) and, where
the backend reports it (GPU, TPU; not CPU), each local device's peak bytes in use."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _host_high_water_mark() -> int | None:
    """VmHWM in bytes, or None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_host_high_water_mark() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current resident set (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StageMemory:
    """Started before a stage's body, read after it."""

    def __init__(self) -> None:
        self.per_stage = _reset_host_high_water_mark()
        self.started = time.perf_counter()

    def summary(self) -> dict[str, Any]:
        host = _host_high_water_mark()
        summary: dict[str, Any] = {"wall_seconds": round(time.perf_counter() - self.started, 2)}
        if host is not None:
            summary["peak_host_memory_bytes"] = host
            # Without the reset (another OS, or a locked-down /proc) the mark covers the
            # whole process so far, not this stage alone: say which.
            summary["peak_host_memory_scope"] = "stage" if self.per_stage else "process"
        devices = [d.memory_stats() for d in jax.local_devices()]
        peaks = [s.get("peak_bytes_in_use") for s in devices if s]
        if peaks and all(p is not None for p in peaks):
            summary["peak_device_memory_bytes"] = max(peaks)  # since the process started
        return summary
