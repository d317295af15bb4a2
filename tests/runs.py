"""One way to build the small run configurations the run tests use: a tiny local model and the tiny corpus."""

from __future__ import annotations

from pathlib import Path

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
