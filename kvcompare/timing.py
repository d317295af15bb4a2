"""Timers that wait for the device: without synchronisation a cuda or mps timer measures only the launch."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """A timestamp taken after all queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()
