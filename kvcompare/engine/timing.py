"""Timers that wait for the device: without synchronisation a cuda or mps timer measures only the launch."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on a cuda or mps ``device`` to finish (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """A timestamp taken after all queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()


class SpanTimer:
    """Sums the device time of spans inside a timed step without synchronising in between.

    Timing a span with :func:`now` would synchronise a cuda or mps device at both ends, slowing the very step
    it sits in. Device events are recorded instead and read when :meth:`take_seconds` is called, after the
    step's own timer has synchronised. On the CPU the clock is read directly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple[object, object]] = []
        self._started: object = None
        self._seconds = 0.0

    def start(self) -> None:
        """Open a span: record a device event (cuda, mps) or read the clock (CPU)."""
        if self.device.type in ("cuda", "mps"):
            module = torch.cuda if self.device.type == "cuda" else torch.mps
            self._started = module.Event(enable_timing=True)
            self._started.record()  # type: ignore[attr-defined]
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        """Close the span :meth:`start` opened; its seconds count towards the next :meth:`take_seconds`."""
        if isinstance(self._started, float):
            self._seconds += time.perf_counter() - self._started
            return
        module = torch.cuda if self.device.type == "cuda" else torch.mps
        end = module.Event(enable_timing=True)
        end.record()
        self._events.append((self._started, end))

    def take_seconds(self) -> float:
        """The time of the spans since the last call, in seconds (waits for their end events)."""
        seconds = self._seconds
        for begin, end in self._events:
            end.synchronize()  # type: ignore[attr-defined]
            seconds += begin.elapsed_time(end) / 1000  # type: ignore[attr-defined]
        self._events.clear()
        self._seconds = 0.0
        return seconds
