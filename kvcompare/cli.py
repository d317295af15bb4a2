"""The `kvcompare` command line: run, report, policies, plugins."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import typing
from pathlib import Path
from typing import Any

DEFAULT_GRID: dict[str, Any] = {
    "policies": ["streaming", "l2", "recent"],
    "cache_sizes": [256, 512],
    "lengths": [1024, 2048],  # two lengths, so that the report can show the effect of length
    "samples": [1],
    "gen": 32,
    "warmup": 4,
}
PRESETS: dict[str, dict[str, Any]] = {
    # The reference report's grid (StreamingLLM against L2 keep_low / random and recent_only).
    "report": {
        "policies": ["streaming", "l2", "l2:mode=random", "recent"],
        "cache_sizes": [256, 512, 1024],
        "lengths": [2024, 5000, 30000],
        "samples": [10, 5, 10],
        "gen": 64,
        "warmup": 20,
    },
}
POLICY_SYNTAX = "name[:key=value[:key=value...]], comma-separated, e.g. streaming,l2:mode=random,streaming:start_size=8"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _skip_layers(text: str) -> list[int]:
    return [] if text.strip().lower() in ("none", "") else _int_list(text)


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser("run", help="measure policies over a grid of cache limits and lengths")
    run.add_argument(
        "--policies", type=_str_list, help=f"policies to compare ({POLICY_SYNTAX}); default streaming,l2,recent"
    )
    run.add_argument("--cache", dest="cache_sizes", type=_int_list, help="cache limits in tokens, e.g. 256,512,1024")
    run.add_argument("--lengths", type=_int_list, help="passage lengths in tokens, e.g. 2024,5000,30000")
    run.add_argument("--samples", type=_int_list, help="passages per length: one count, or one per length")
    run.add_argument(
        "--model",
        default=None,
        help="smollm2-135m (embedded, default), a .gguf file, a local folder or a Hugging Face id",
    )
    run.add_argument(
        "--dataset",
        default=None,
        help="gutenberg (embedded, default), pg19, or a .txt/.jsonl/.parquet path, folder or glob",
    )
    run.add_argument("--text-column", help="column holding the text in a .jsonl/.parquet dataset (default text)")
    run.add_argument("--all-books", action="store_true", help="gutenberg: keep the Bible, poems and plays too")
    run.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    run.add_argument("--stride", type=int, help="tokens per forward chunk (default 64)")
    run.add_argument("--positions", type=_str_list, help="true and/or shift (default shift)")
    run.add_argument(
        "--skip-layers", type=_skip_layers, help="layers that keep the full cache, e.g. 0,1 (default) or none"
    )
    run.add_argument("--evict-block", type=int, help="evict at least this many tokens at once (default 1)")
    run.add_argument("--gen", type=int, help="generated tokens counted in the latency pass (default 32)")
    run.add_argument("--warmup", type=int, help="decode steps before counting (default 4)")
    run.add_argument("--seed", type=int, help="passage sampling and random policies (default 0)")
    run.add_argument("--bucket", type=int, help="positions per bucket of the perplexity curve (default 128)")
    run.add_argument("--no-baseline", action="store_true", help="do not measure the full cache")
    run.add_argument("--preset", choices=sorted(PRESETS), help="report: the reference report's grid")
    run.add_argument("--out", type=Path, help="results folder (default: a new folder under reports/runs/)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
    run.add_argument("--force", action="store_true", help="replace the results already in --out")
    run.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_config(args: argparse.Namespace) -> Any:
    from kvcompare.runner import RunConfig

    grid = {**DEFAULT_GRID, **PRESETS.get(args.preset or "", {})}
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in given.items() if v is not None and v is not False}
    merged = {**grid, **values}
    if len(merged["samples"]) == 1:
        merged["samples"] = merged["samples"] * len(merged["lengths"])
    merged["baseline"] = not args.no_baseline
    merged["all_books"] = args.all_books
    return RunConfig(**merged)


def cmd_run(args: argparse.Namespace) -> int:
    from kvcompare.runner import run

    config = _run_config(args)
    out = args.out or Path("reports/runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    folder = run(config, out, resume=args.resume, force=args.force, progress=not args.quiet)
    from kvcompare.report import build_report, summary_table

    print(summary_table(folder))
    print(f"\nresults: {folder}/cells/*.parquet (polars.read_parquet), run.json beside them")
    if not args.no_report:
        paths = build_report(folder)
        print(f"report:  {paths.html} and {paths.markdown}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvcompare.report import build_report

    paths = build_report(args.run_dir, args.out)
    print(f"report: {paths.html} and {paths.markdown}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvcompare.plugins import get_registry
    from kvcompare.policy import parameter_defaults, parameter_types

    registry = get_registry()
    for name in registry.names():
        entry = registry.entry(name)
        doc = (entry.cls.__doc__ or "").strip().splitlines()[0] if entry.cls.__doc__ else ""
        print(f"{name}  (plugin: {entry.plugin})\n    {doc}")
        defaults = parameter_defaults(entry.cls)
        for key, kind in parameter_types(entry.cls).items():
            shown = (
                "|".join(map(str, typing.get_args(kind)))
                if typing.get_origin(kind) is typing.Literal
                else kind.__name__
            )
            print(f"    {key}: {shown} = {defaults[key]!r}")
        if not defaults:
            print("    (no parameters)")
    print(f"\nSyntax: {POLICY_SYNTAX}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from kvcompare.plugins import get_host

    host = get_host()
    host.registry()
    for info in host.plugins():
        version = f"{info.distribution} {info.version}".strip() or "registered in-process"
        print(f"{info.name:16} {version:24} {info.module}")
    for failure in host.failures:
        print(f"{failure.name:16} FAILED: {failure.error}")
    return 1 if host.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvcompare", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    _add_run_parser(commands)
    report = commands.add_parser("report", help="build tables, charts and HTML/Markdown from a results folder")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/report)")
    commands.add_parser("policies", help="list policies with their parameters, defaults and plugin")
    commands.add_parser("plugins", help="list plugins and their versions")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    handlers = {"run": cmd_run, "report": cmd_report, "policies": cmd_policies, "plugins": cmd_plugins}
    from kvcompare.corpus import CorpusError
    from kvcompare.fetch import FetchError
    from kvcompare.models import ModelError
    from kvcompare.policy import PolicyError
    from kvcompare.results import ResultsError
    from kvcompare.rope import UnsupportedModelError
    from kvcompare.runner import ConfigError

    try:
        return handlers[args.command](args)
    except (ConfigError, PolicyError, CorpusError, FetchError, ModelError, ResultsError, UnsupportedModelError) as err:
        print(f"kvcompare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
