"""The whole measuring pipeline (`kvcompare.run.runner.run`) on a GPU, without the Hub or the embedded GGUF.

    python benchmarks/gpu_pipeline.py --device cuda --out /tmp/gpu-run

A device machine may not reach any registry, and the embedded model's 93 MB GGUF may be too large to carry
there. So this builds a model folder with SmolLM2-135M's shapes (random weights: step time depends on shapes,
not weights) and a small byte-level BPE tokenizer, and a corpus of the test text repeated, then runs the
real runner: rounds, the A/A control, raw timings and intervals. It prints each cell's speed with its
interval and the paired TPOT change of each policy against `full` (mean over rounds, bootstrap interval),
read back from the Parquet files with pyarrow alone.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from kvcompare.config import RunConfig
from kvcompare.run.runner import run
from kvcompare.stats import change_pct, mean_estimate
from kvcompare.testing import tiny_llama

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tests" / "data" / "tiny_corpus.txt"


def build_inputs(folder: Path, shapes: str) -> tuple[Path, Path]:
    """A model folder (SmolLM2 or tiny shapes, random weights, a trained BPE tokenizer) and a long corpus file."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    text = TEXT.read_text()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    model_dir = folder / "model"
    tokenizer.save_pretrained(model_dir)
    if shapes == "smollm2":
        from cuda_check import SMOLLM2_SHAPES  # type: ignore[import-not-found]

        LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).save_pretrained(model_dir)
    else:
        tiny_llama(vocab_size=512, max_position_embeddings=16384).save_pretrained(model_dir)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([text] * 60))
    return model_dir, corpus


def report(out: Path) -> None:
    cells = pq.read_table(out / "cells").to_pylist()
    timings = pq.read_table(out / "timings").to_pylist()
    print("\n| policy | limit | len | status | TTFT (s) [95%] | TPOT (ms) [95%] | one-pass TTFT (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(cells, key=lambda r: (r["seq_len"], r["policy"], r["cache_size"] or 0)):
        if row["status"] != "ok":
            print(f"| {row['policy']} | {row['cache_size']} | {row['seq_len']} | {row['error']} |")
            continue
        ttft = f"{row['ttft_s']:.4f} [{row['ttft_ci_low']:.4f}, {row['ttft_ci_high']:.4f}]"
        tpot = f"{1e3 * row['tpot_s']:.3f} [{1e3 * row['tpot_ci_low']:.3f}, {1e3 * row['tpot_ci_high']:.3f}]"
        oneshot = f"{row['ttft_oneshot_s']:.4f}" if row["ttft_oneshot_s"] is not None else "–"
        print(f"| {row['policy']} | {row['cache_size']} | {row['seq_len']} | ok | {ttft} | {tpot} | {oneshot} |")
    # per trial TPOT, then pairs of (policy trial, full trial) in the same passage, mode, session and round
    steps: dict[tuple, list[float]] = defaultdict(list)
    for t in timings:
        if t["kind"] == "step":
            steps[(t["cell_id"], t["role"], t["session"], t["round"])].append(t["seconds"])
    by_id = {row["cell_id"]: row for row in cells}
    full: dict[tuple, float] = {}
    for (cell, role, session, rnd), values in steps.items():
        row = by_id[cell]
        if row["policy"] == "full" and role in ("cell", "baseline"):
            full[(row["seq_len"], row["sample_id"], row["positions"], session, rnd)] = statistics.median(values)
    changes: dict[tuple, list[float]] = defaultdict(list)
    for (cell, role, session, rnd), values in steps.items():
        row = by_id[cell]
        key = (row["seq_len"], row["sample_id"], row["positions"], session, rnd)
        base = full.get(key)
        if base is None:
            continue
        if role == "aa_control":
            changes[("A/A control", None, row["seq_len"])].append(change_pct(statistics.median(values), base) or 0.0)
        elif row["policy"] != "full":
            label = (row["policy"], row["cache_size"], row["seq_len"])
            changes[label].append(change_pct(statistics.median(values), base) or 0.0)
    print("\n| configuration | len | pairs | TPOT change vs full (%) [95%] | significant |")
    print("|---|---|---|---|---|")
    for (policy, limit, seq_len), values in sorted(changes.items(), key=lambda kv: (kv[0][2], str(kv[0][0]))):
        est = mean_estimate(values)
        interval = "no interval" if est.low is None else f"[{est.low:+.1f}, {est.high:+.1f}]"
        name = policy if limit is None else f"{policy}@{limit}"
        print(f"| {name} | {seq_len} | {est.n} | {est.value:+.1f} {interval} | {est.significant} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--cache", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-pipeline"))
    args = parser.parse_args()
    model_dir, corpus = build_inputs(args.out / "inputs", args.shapes)
    lengths = [int(n) for n in args.lengths.split(",")]
    config = RunConfig(
        policies=["streaming", "recent"],
        cache_sizes=[args.cache],
        lengths=lengths,
        samples=[1],
        model=str(model_dir),
        dataset=str(corpus),
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
    )
    out = run(config, args.out / "run", force=True, progress=False)
    report(out)


if __name__ == "__main__":
    main()
