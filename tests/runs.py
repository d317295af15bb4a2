"""One way to build the small run configurations the run tests use: a tiny local model and the tiny corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcompare.config import RunConfig

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def tiny_run(model_dir: Path, **changes: object) -> RunConfig:
    """A run small enough for the fast tests (seconds); each test states only what it changes."""
    values: dict[str, object] = {
        "policies": ["recent"],
        "cache_sizes": [16],
        "lengths": [48],
        "samples": [1],
        "model": str(model_dir),
        "dataset": str(CORPUS),
        "stride": 8,
        "gen": 2,
        "warmup": 0,
        "repeats": 2,
        "bucket": 16,
        "skip_layers": [0],
    }
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


def retrieve(executor: Any, prompt: Any, policy: Any, config: Any, chunk: int) -> Any:
    """A passkey prompt run as the passkey task runs it (an ``answer`` request): whether greedy decoding gives
    the key (``correct``), the answer tokens matched in a row and the answer's log-probability."""
    import types

    from kvcompare.engine.requests import answer

    got = answer(executor, prompt.tokens, prompt.answer, policy, config, chunk)
    return types.SimpleNamespace(correct=got.matched == len(prompt.answer), matched=got.matched, logprob=got.logprob)
