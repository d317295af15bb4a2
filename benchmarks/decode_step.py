"""Decode step time of each policy with N tokens already in context, as ratios to `full`, in one run.

    python benchmarks/decode_step.py --contexts 2048,4096,16384 --cache 1024 --rounds 5
    python benchmarks/decode_step.py --compression prefill --ratio 0.5 --contexts 8192 --policies full,snapkv

With ``--compile`` every policy runs twice, eagerly and as the compiled decode step (kvcompare.engine.compiled), side
by side in the same rounds; each step is also given as a ratio to the physics floor (the weights and the keys and
values it reads, at the memory bandwidth measured at the start), and the compiled step as a ratio to the eager one:

    python benchmarks/decode_step.py --compile --contexts 2048,8192 --policies full,streaming,l2,recent

With ``--compression prefill`` each context is prefilled whole and compressed once (the prefill setting), so the
steps run on the compressed cache; ``--ratio`` gives budgets as shares of the context removed instead of --cache.

Every policy's cache is prefilled once per context (untimed). Then each round decodes `--steps` tokens under
every policy in turn, the order rotating by one policy per round, so the machine's drift touches all alike;
each policy's sequence simply continues from round to round. Printed per context and policy: the median
decode step, the eviction (slot work, scoring) and the signal collection (attention a policy reads) per step
and their shares of the step, and the step time relative to `full`, the median over rounds of each round's
ratio of medians, with the range over rounds.
"""

from __future__ import annotations

import statistics

import torch
from common import base_parser, book_tokens, setup

from kvcompare.config import DEFAULT_WINDOW, CacheConfig, ratio_limit
from kvcompare.engine.executor import Executor, greedy
from kvcompare.engine.physics import kv_read_bytes, memory_bandwidth, tpot_floor, weight_bytes
from kvcompare.plugins import get_registry


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--contexts", default="2048,4096,16384")
    parser.add_argument("--policies", default="full,streaming,l2,recent")
    parser.add_argument("--cache", default="1024", help="cache limits, comma-separated")
    parser.add_argument("--stride", type=int, default=64, help="prefill chunk")
    parser.add_argument("--positions", default="shift")
    parser.add_argument("--skip-layers", default="0,1")
    parser.add_argument("--steps", type=int, default=32, help="counted decode steps per policy and round")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted decode steps before them, each round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--evict-block", type=int, default=1)
    parser.add_argument("--layer-budget", default="uniform", help="uniform or pyramid[:beta=B]")
    parser.add_argument("--compression", default="continuous", choices=["continuous", "prefill"])
    parser.add_argument("--ratio", default="", help="budgets as compression ratios, comma-separated (replaces --cache)")
    parser.add_argument("--compile", action="store_true", help="also run every policy as the compiled decode step")
    args = parser.parse_args()
    loaded, executor = setup(args)
    executors = {"eager": executor}
    if args.compile:
        executors["compiled"] = Executor(loaded.model)
        executors["compiled"].compile_decode_steps()
    bandwidth = memory_bandwidth(executor.device)
    weights = weight_bytes(loaded.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    ratios = [float(r) for r in args.ratio.split(",") if r]
    skip = tuple(int(i) for i in args.skip_layers.split(",") if i)
    registry = get_registry()
    policies = args.policies.split(",")
    tokens = book_tokens(args, loaded, max(contexts))
    print(
        f"{loaded.name} on {args.device}: decode steps after N tokens of {args.book}; "
        f"{'ratios ' + str(ratios) if ratios else 'limits ' + args.cache}, {args.compression} setting, "
        f"{args.positions} positions, skip layers {list(skip)}, evict block {args.evict_block}, "
        f"layer budget {args.layer_budget}, "
        f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up); memory bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s, weights {weights / 1e6:.0f} MB"
    )
    print(
        "| context | policy | mode | step (ms) | evict (ms/step) | evict share | signal (ms/step) | signal share "
        "| step / full [range over rounds] | floor (ms) | step / floor | compiled / eager [range over rounds] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_round = args.warmup + args.steps
    for context in contexts:
        runs = {}
        floors = {}
        budgets = [(ratio_limit(context, r), r) for r in ratios] or [(int(c), None) for c in args.cache.split(",")]
        for spec in policies:
            for limit, ratio in budgets if registry.build(spec).bounded else [(None, None)]:
                config = CacheConfig(
                    limit,
                    args.stride,
                    args.positions,
                    skip,
                    args.evict_block,
                    args.layer_budget,
                    reserve=DEFAULT_WINDOW if args.compression == "prefill" else None,
                    compression=args.compression,
                    ratio=ratio,
                )
                name = spec if limit is None else f"{spec}@{limit}"
                floors[name] = tpot_floor(weights, kv_read_bytes(executor.layout, config, context), bandwidth)
                for mode, runner in executors.items():
                    cache = runner.new_cache(registry.build(spec), config, context + args.rounds * per_round + 1)
                    with runner.attached():
                        prompt = tokens[:context].to(runner.device).view(1, -1)
                        token = greedy(runner.prefill(cache, prompt, args.stride))
                        runner.compress(cache)  # the prefill setting's one compression (nothing in the continuous)
                    runs[name, mode] = [runner, cache, token]
        medians: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        evict: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        signal: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        keys = list(runs)
        for r in range(args.rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                runner, cache, token = runs[key]
                with runner.attached():
                    steps = runner.decode(cache, token, per_round)
                if any(steps.compile_s[args.warmup :]):
                    raise SystemExit(f"{key}: a counted step compiled; raise --warmup")
                runs[key][2] = torch.tensor([[steps.tokens[-1]]], device=runner.device)
                medians[key].append(statistics.median(steps.step_s[args.warmup :]))
                evict[key].append(statistics.fmean(steps.evict_s[args.warmup :]))
                signal[key].append(statistics.fmean(steps.signal_s[args.warmup :]))
        for name, mode in keys:
            key = (name, mode)
            step, evicted = statistics.median(medians[key]), statistics.median(evict[key])
            signalled = statistics.median(signal[key])
            to_full = to_eager = ""
            if ("full", mode) in medians and name != "full":
                to_full = _ratio(medians[key], medians["full", mode])
            if mode == "compiled":
                to_eager = _ratio(medians[key], medians[name, "eager"])
            floor = floors[name]
            print(
                f"| {context} | {name} | {mode} | {1000 * step:.2f} | {1000 * evicted:.3f} | "
                f"{100 * evicted / step:.2f}% | {1000 * signalled:.3f} | {100 * signalled / step:.2f}% | {to_full} | "
                f"{'' if floor is None else f'{1000 * floor:.2f}'} | {'' if floor is None else f'{step / floor:.2f}'} "
                f"| {to_eager} |",
                flush=True,
            )
    status = executors.get("compiled")
    if status is not None:
        print(f"compile: {status.compile_status}")


def _ratio(numerators: list[float], denominators: list[float]) -> str:
    """The median over rounds of each round's ratio, with the range over rounds."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"


if __name__ == "__main__":
    main()
