"""A cell's peak_mem_bytes alone and after a longer cell, in one process (issue 34: the figure is the cell's own).

python benchmarks/peak_memory.py --short 256 --long 1024 --rounds 3

For each pass kind (the quality pass, `Executor.score`; a latency trial, `Executor.generate`), the `full` cell of
``--short`` tokens is measured, then one of ``--long`` tokens, then the short one again; each round prints the three
figures in MB and the short cell's change. After a run-like warm-up (one latency trial), the change should stay
within the CPU figure's spread (resident memory: a few MB), far below the longer cell's own peak.
"""

from __future__ import annotations

from common import base_parser, book_tokens, setup

from kvcompare.config import CacheConfig
from kvcompare.plugins import get_registry


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--short", type=int, default=256)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen", type=int, default=32)
    args = parser.parse_args()
    loaded, executor = setup(args)
    tokens = book_tokens(args, loaded, max(args.short, args.long))
    full, config = get_registry().build("full"), CacheConfig(None, 64, "shift", (0, 1))

    def peak(kind: str, length: int) -> float:
        ids = tokens[:length]
        if kind == "quality":
            result = executor.score(ids, full, config)
        else:
            result = executor.generate(ids, full, config, gen=args.gen, warmup=4)
        return (result.peak_mem_bytes or 0) / 1e6

    executor.generate(tokens[: args.short], full, config, gen=4, warmup=0)  # a run's untimed warm-up trial
    print(f"{args.model} on {args.device}: `full`, {args.short} tokens alone and after {args.long} tokens (MB)")
    print(f"| pass | round | {args.short} | {args.long} | {args.short} after | change |")
    print("|---|---|---|---|---|---|")
    for kind in ("quality", "latency"):
        for round_ in range(args.rounds):
            alone, long, after = peak(kind, args.short), peak(kind, args.long), peak(kind, args.short)
            print(f"| {kind} | {round_ + 1} | {alone:.1f} | {long:.1f} | {after:.1f} | {after - alone:+.1f} |")


if __name__ == "__main__":
    main()
