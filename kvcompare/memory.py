"""Peak memory of the process (CPU) or of the device allocator (cuda, mps) during one measurement."""

from __future__ import annotations

import psutil
import torch


class PeakMemory:
    """Samples memory at chunk boundaries, outside the timers, and keeps the maximum."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type == "cuda":
            current = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            current = torch.mps.current_allocated_memory()
        else:
            current = self._process.memory_info().rss
        self.peak = max(self.peak, current)
