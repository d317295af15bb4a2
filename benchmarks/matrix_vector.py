"""How fast a one-token step's matrix-vector products read their weights: eager ``F.linear`` (BLAS) against the
reductions compiled CPU steps generate (kvcompare.engine.compiled.inductor_matrix_vector), in one run.

    python benchmarks/matrix_vector.py --threads 2

The weights are those of a decode step of the embedded model's shape (per layer q, k, v, o, gate, up, down; then
the LM head), far larger together than the processor's caches, so each product reads its weight from memory as a
real step does. Printed per round: the seconds of the whole chain and the bytes read per second, eager and
compiled, and compiled / eager; then the median over rounds with the range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompare.engine.compiled import inductor_matrix_vector

#: (out, in) of one layer's linear layers in SmolLM2-135M: q, k, v, o, gate, up, down.
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def chain(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every weight's product with ``x`` (``[1, 1, in]``; its first ``in`` entries where a weight is narrower)."""
    return [torch.nn.functional.linear(x[..., : w.shape[1]], w) for w in weights]


def timed(fn: object, repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn`` after three untimed ones."""
    assert callable(fn)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round and mode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = [torch.randn(shape) for _ in range(args.layers) for shape in LAYER] + [torch.randn(LM_HEAD)]
    read = sum(w.numel() * w.element_size() for w in weights)
    x = torch.randn(1, 1, 1536)
    compiled = torch.compile(chain, backend=inductor_matrix_vector, fullgraph=True)
    with torch.inference_mode():
        worst = max(float((a - b).abs().max()) for a, b in zip(chain(x, weights), compiled(x, weights), strict=True))
        threads = torch.get_num_threads()
        print(f"{len(weights)} weights, {read / 1e6:.0f} MB, {threads} threads; max |difference| {worst:.2e}")
        print("| round | eager (ms) | eager GB/s | compiled (ms) | compiled GB/s | compiled / eager |")
        print("|---|---|---|---|---|---|")
        ratios = []
        for r in range(args.rounds):
            eager = timed(lambda: chain(x, weights), args.repeats)
            fast = timed(lambda: compiled(x, weights), args.repeats)
            ratios.append(fast / eager)
            print(
                f"| {r} | {1000 * eager:.2f} | {read / eager / 1e9:.1f} | {1000 * fast:.2f} | {read / fast / 1e9:.1f} "
                f"| {fast / eager:.3f} |",
                flush=True,
            )
    print(f"compiled / eager: median {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")


if __name__ == "__main__":
    main()
