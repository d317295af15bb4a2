"""Quality passes of a passage's cells batched (one pass, a batch row per cell) against one by one, in one run.

    python benchmarks/quality_batch.py --tokens 2048 --policies streaming,l2,recent,h2o --cache 256,512

Each round runs every cell's quality pass one by one, then all of them as one batch (the two orders
alternate between rounds, so the machine's drift touches both alike). Printed: each way's throughput (tokens
scored x cells per second), the batched / one-by-one speed-up per round with its median and range, and the
largest relative PPL difference between the two ways for any cell (the batch must not change what it measures).
"""

from __future__ import annotations

import statistics
import time

from common import base_parser, book_tokens, setup

from kvcompare.config import CacheConfig
from kvcompare.engine.executor import QualityResult
from kvcompare.plugins import get_registry


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--policies", default="streaming,l2,recent,h2o")
    parser.add_argument("--cache", default="256,512", help="cache limits, comma-separated")
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--positions", default="shift")
    parser.add_argument("--skip-layers", default="0,1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded, executor = setup(args)
    tokens = book_tokens(args, loaded, args.tokens)
    registry = get_registry()
    skip = tuple(int(i) for i in args.skip_layers.split(",") if i)
    cells = [
        (registry.build(spec), CacheConfig(int(limit), args.stride, args.positions, skip))
        for spec in args.policies.split(",")
        for limit in args.cache.split(",")
    ]
    scored = (args.tokens - 1) * len(cells)
    print(
        f"{args.book}: first {args.tokens} tokens, {len(cells)} cells "
        f"({args.policies} x limits {args.cache}), stride {args.stride}, {args.positions} positions, "
        f"skip layers {list(skip)}, {args.device}, {executor.layout.dtype}"
    )
    executor.score(tokens[: 4 * args.stride], *cells[0])  # warm-up, untimed

    def one_by_one() -> tuple[float, list[QualityResult]]:
        started = time.perf_counter()
        results = [executor.score(tokens, policy, config) for policy, config in cells]
        return time.perf_counter() - started, results

    def batched() -> tuple[float, list[QualityResult]]:
        started = time.perf_counter()
        results = executor.score_batch(tokens, cells)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return time.perf_counter() - started, results  # type: ignore[return-value]

    ratios, worst = [], 0.0
    print("| round | one by one (s) | batched (s) | one by one (tok x cells/s) | batched (tok x cells/s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for round_index in range(args.rounds):
        ways = (one_by_one, batched) if round_index % 2 == 0 else (batched, one_by_one)
        timed = {way.__name__: way() for way in ways}
        (single_s, single), (batch_s, batch) = timed["one_by_one"], timed["batched"]
        ratios.append(single_s / batch_s)
        for alone, together in zip(single, batch, strict=True):
            ppl_alone, ppl_together = alone.nll.mean(), together.nll.mean()
            worst = max(worst, abs(float(ppl_together - ppl_alone)))
        print(
            f"| {round_index + 1} | {single_s:.1f} | {batch_s:.1f} | {scored / single_s:.0f} | "
            f"{scored / batch_s:.0f} | {ratios[-1]:.2f}x |",
            flush=True,
        )
    print(
        f"\nspeed-up, batched over one by one: median {statistics.median(ratios):.2f}x "
        f"[range {min(ratios):.2f}, {max(ratios):.2f}] over {args.rounds} rounds"
    )
    # mean NLL differences are log-PPL differences, so this is the relative PPL difference (to first order)
    print(f"largest relative PPL difference, batched vs one by one: {worst:.2e}")


if __name__ == "__main__":
    main()
