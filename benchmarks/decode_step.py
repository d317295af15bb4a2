"""Decode step time of `full` against `streaming` with a given number of tokens already in context.

    python benchmarks/decode_step.py --contexts 1024,4096,16384 --cache 1024 --steps 32

Prints the median step time of each policy and the ratio full / streaming.
"""

from __future__ import annotations

import statistics

from common import base_parser, book_tokens, setup

from kvcompare.config import CacheConfig
from kvcompare.plugins import get_registry


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--cache", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--evict-block", type=int, default=1)
    args = parser.parse_args()
    loaded, executor = setup(args)
    contexts = [int(c) for c in args.contexts.split(",")]
    tokens = book_tokens(args, loaded, max(contexts))
    registry = get_registry()
    print(f"decode steps after a prefill of N tokens; cache limit {args.cache}, {args.steps} steps, {args.device}")
    print("| context | policy | median step (ms) | evict (ms/step) | prefill (s) | full / streaming |")
    print("|---|---|---|---|---|---|")
    for context in contexts:
        medians = {}
        for spec in ("full", "streaming"):
            policy = registry.build(spec)
            config = CacheConfig(args.cache, args.stride, "shift", (0, 1), args.evict_block)
            timed = executor.generate(tokens[:context], policy, config, gen=args.steps, warmup=args.warmup)
            medians[spec] = statistics.median(timed.step_s)
            ratio = f"{medians['full'] / medians['streaming']:.2f}x" if spec == "streaming" else ""
            print(
                f"| {context} | {spec} | {1000 * medians[spec]:.2f} | "
                f"{1000 * sum(timed.evict_s) / len(timed.evict_s):.2f} | {timed.ttft_s:.2f} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
