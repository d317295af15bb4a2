"""Device check for cuda or mps: executor correctness on tiny models, then decode step time full vs streaming.

    python benchmarks/cuda_check.py --device cuda

Correctness is the tests marked `cuda` (tests/test_devices.py: full-cache logits, limits, re-rotation, in
float32 and bfloat16), run first with pytest; then the timing table.

The timing part uses a randomly initialised model with SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads,
head_dim 64): step time depends on shapes, not weights. Prints PASS/FAIL lines and a ratio table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import Executor
from kvcompare.plugins import get_registry

SMOLLM2_SHAPES = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def time_decode(device: torch.device, dtype: torch.dtype, contexts: list[int], cache: int, steps: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).to(device=device, dtype=dtype).eval()
    executor = Executor(model)
    registry = get_registry()
    tokens = torch.randint(0, 49152, (max(contexts),), generator=torch.Generator().manual_seed(0))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\ndecode step, SmolLM2-135M shapes (random weights), {dtype}, {where}")
    print("| context | full (ms) | streaming (ms) | streaming evict (ms/step) | full / streaming |")
    print("|---|---|---|---|---|")
    for context in contexts:
        medians, evict = {}, 0.0
        for spec in ("full", "streaming"):
            timed = executor.generate(tokens[:context], registry.build(spec), CacheConfig(cache, 64), steps, 8)
            medians[spec] = statistics.median(timed.step_s)
            evict = sum(timed.evict_s) / len(timed.evict_s)
        print(
            f"| {context} | {1000 * medians['full']:.2f} | {1000 * medians['streaming']:.2f} | {1000 * evict:.3f} | "
            f"{medians['full'] / medians['streaming']:.2f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--cache", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        tests = Path(__file__).resolve().parent.parent / "tests" / "test_devices.py"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(tests)], check=False)
    contexts = [int(c) for c in args.contexts.split(",")]
    for dtype in (torch.float32, torch.bfloat16):
        time_decode(device, dtype, contexts, args.cache, args.steps)


if __name__ == "__main__":
    main()
