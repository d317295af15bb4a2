"""Perplexity of each policy on a book's first tokens, in both position modes, with and without skip layers.

python benchmarks/policy_ppl.py --tokens 4096 --cache 512 --stride 64
"""

from __future__ import annotations

import math
import time

from common import base_parser, book_tokens, setup

from kvcompare.config import CacheConfig
from kvcompare.plugins import get_registry


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cache", type=int, default=512)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--policies", default="full,streaming,l2,l2:mode=random,recent")
    parser.add_argument("--positions", default="true,shift")
    parser.add_argument("--skip-sets", default="0,1;none", help="skip-layer sets separated by ';'")
    parser.add_argument("--layer-budget", default="uniform", help="uniform or pyramid[:beta=B]")
    args = parser.parse_args()
    loaded, executor = setup(args)
    tokens = book_tokens(args, loaded, args.tokens)
    registry = get_registry()
    print(
        f"{args.book}: first {args.tokens} tokens, cache {args.cache}, stride {args.stride}, "
        f"layer budget {args.layer_budget}, {args.device}"
    )
    print("| policy | positions | skip layers | ppl | accuracy | ppl vs full | seconds |")
    print("|---|---|---|---|---|---|---|")
    skip_sets = [() if s == "none" else tuple(int(i) for i in s.split(",")) for s in args.skip_sets.split(";")]
    for skip in skip_sets:
        baseline = None
        for spec in args.policies.split(","):
            policy = registry.build(spec)
            modes = args.positions.split(",")
            for mode in modes if policy.bounded else modes[:1]:
                started = time.perf_counter()
                config = CacheConfig(args.cache, args.stride, mode, skip, layer_budget=args.layer_budget)
                result = executor.score(tokens, policy, config)
                ppl = math.exp(result.nll.mean())
                baseline = baseline or ppl
                print(
                    f"| {policy.label()} | {mode if policy.bounded else 'any'} | {list(skip) or 'none'} | {ppl:.6f} | "
                    f"{result.correct.mean():.4f} | {100 * (ppl / baseline - 1):+.2f}% | "
                    f"{time.perf_counter() - started:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
