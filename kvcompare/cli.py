"""The `kvcompare` command line: run, report, policies, plugins."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The reference report's grid (StreamingLLM against L2 keep_low / random and recent_only).
    "report": {
        "policies": ["streaming", "l2", "l2:mode=random", "recent"],
        "cache_sizes": [256, 512, 1024],
        "lengths": [2024, 5000, 30000],
        "samples": [10, 5, 10],
        "gen": 64,
        "warmup": 20,
        "repeats": 5,
    },
}
POLICY_SYNTAX = "name[:key=value[:key=value...]], comma-separated, e.g. streaming,l2:mode=random,streaming:start_size=8"
TASK_SYNTAX = "as policies, a tuple's items separated by /, e.g. ppl,passkey:depths=0.1/0.5:haystack=text,niah_single"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def _skip_layers(text: str) -> list[int]:
    return [] if text.strip().lower() in ("none", "") else _int_list(text)


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_run_parser(commands: Any) -> None:
    from kvcompare.config import RunConfig

    d = RunConfig()  # the one source of defaults; the help shows them

    def listed(values: list[Any]) -> str:
        return ",".join(map(str, values))

    run = commands.add_parser(
        "run",
        help="measure policies over a grid of cache limits and lengths",
        description=f"Default grid: policies {listed(d.policies)} against full, cache limits {listed(d.cache_sizes)}, "
        f"lengths {listed(d.lengths)} with {d.samples[0]} sample each, on {d.model} and {d.dataset}.",
    )
    run.add_argument(
        "--policies", type=_str_list, help=f"policies to compare ({POLICY_SYNTAX}); default {listed(d.policies)}"
    )
    run.add_argument(
        "--cache", dest="cache_sizes", type=_int_list, help=f"cache limits in tokens (default {listed(d.cache_sizes)})"
    )
    run.add_argument(
        "--ratio",
        dest="ratios",
        type=_float_list,
        help="budgets as compression ratios instead of --cache: the share of each context removed, as kvpress and "
        "the literature mean it (each layer keeps int(context x (1 - ratio)) tokens; rows record both), e.g. "
        "0.25,0.5,0.75",
    )
    run.add_argument("--lengths", type=_int_list, help=f"passage lengths in tokens (default {listed(d.lengths)})")
    run.add_argument(
        "--samples", type=_int_list, help=f"passages per length: one count, or one per length (default {d.samples[0]})"
    )
    run.add_argument(
        "--model",
        default=None,
        help=f"{d.model} (embedded, default), a .gguf file, a local folder or a Hugging Face id",
    )
    run.add_argument(
        "--dataset",
        default=None,
        help=f"{d.dataset} (embedded, default), pg19, or a .txt/.jsonl/.parquet path, folder or glob",
    )
    run.add_argument(
        "--text-column", help=f"column holding the text in a .jsonl/.parquet dataset (default {d.text_column})"
    )
    run.add_argument("--all-books", action="store_true", help="gutenberg: keep the Bible, poems and plays too")
    run.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"], help=f"default {d.device}")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=f"default {d.dtype}")
    run.add_argument("--stride", type=int, help=f"tokens per forward chunk (default {d.stride})")
    run.add_argument(
        "--task",
        dest="tasks",
        type=_str_list,
        help=f"tasks, comma-separated, with parameters as policies take them: ppl, passkey, RULER's niah_single, "
        f"niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe (see `kvcompare tasks`; default "
        f"{listed(d.tasks)})",
    )
    run.add_argument(
        "--depths",
        type=_float_list,
        help=f"passkey: needle depths from 0 (start) to 1 (end), as passkey:depths=0.1/0.5 "
        f"(default {listed(d.depths)})",
    )
    run.add_argument(
        "--haystack",
        choices=["repeat", "text"],
        help="passkey filler: the classic repeated sentence (repeat, default) or passages of --dataset (text)",
    )
    run.add_argument(
        "--bos",
        choices=["auto", "always", "never"],
        help="passages and prompts start with the tokenizer's BOS token: as it starts a document (auto, default), "
        "always, or never",
    )
    run.add_argument("--positions", type=_str_list, help=f"true and/or shift (default {listed(d.positions)})")
    run.add_argument(
        "--compression",
        type=_str_list,
        help="when the cache is cut: continuous (before every chunk and decode step, StreamingLLM's setting) and/or "
        "prefill (once, after the context is prefilled whole, as SnapKV, PyramidKV and kvpress; then the question "
        f"and answer run on a cache that only grows) (default {listed(d.compression)})",
    )
    run.add_argument(
        "--query-aware",
        action="store_true",
        help="prefill setting: the question is part of the compressed context, so the policy sees it (default: "
        "query-agnostic, kvpress's default: the context is compressed without the question)",
    )
    run.add_argument(
        "--skip-layers",
        type=_skip_layers,
        help=f"layers that keep the full cache, e.g. {listed(d.skip_layers)} (default) or none",
    )
    run.add_argument(
        "--evict-block", type=int, help=f"evict at least this many tokens at once (default {d.evict_block})"
    )
    run.add_argument(
        "--layer-budget",
        help="how the limit is shared among compressed layers: uniform (default), or pyramid[:beta=B] "
        "(PyramidKV: more slots in lower layers, the same total)",
    )
    run.add_argument("--gen", type=int, help=f"generated tokens counted in the latency pass (default {d.gen})")
    run.add_argument("--warmup", type=int, help=f"decode steps before counting (default {d.warmup})")
    run.add_argument(
        "--repeats",
        type=int,
        help="latency trials per cell, interleaved in rounds with the other cells of a passage; 0: a quality-only "
        f"run, speed not measured (default {d.repeats})",
    )
    run.add_argument(
        "--prefill-chunk",
        type=int,
        help="tokens per forward pass when the latency pass prefills the prompt (default: the stride); "
        "must be below the cache limit",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="decode steps run as one compiled, fixed-shape step (torch.compile; CUDA graphs on cuda), the same for "
        "every policy; each cache shape compiles before its first decode step, never timed. A model or device that "
        "cannot be compiled runs eagerly, with a notice in the report",
    )
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: the machine's physical cores)")
    run.add_argument(
        "--quality-batch",
        type=int,
        help="quality passes of up to N cells of a passage run as one batch, a row per cell, with the same "
        "results (default: as many as fit in half the free memory; 1: one by one). Latency is never batched",
    )
    run.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="measure passages on Ray actors, one per device: a cluster address, auto (the running cluster, "
        "the default of a bare --ray) or local (start one here); pip install 'kvcompare[ray]'",
    )
    run.add_argument(
        "--workers", type=int, help="with --ray: actors (default one per GPU with --device cuda, else one)"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells, the passages and an estimated time per device (a few calibration passes), "
        "then stop: nothing is measured or written",
    )
    run.add_argument("--seed", type=int, help=f"passage sampling (default {d.seed})")
    run.add_argument("--bucket", type=int, help=f"positions per bucket of the perplexity curve (default {d.bucket})")
    run.add_argument("--no-baseline", action="store_true", help="do not measure the full cache")
    run.add_argument("--preset", choices=sorted(PRESETS), help="report: the reference report's grid")
    run.add_argument("--out", type=Path, help="results folder (default: a new folder under reports/runs/)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
    run.add_argument(
        "--force", action="store_true", help="replace the results in --out (only a folder kvcompare wrote)"
    )
    run.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bars, no notices: warnings and errors only")
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="debugging detail too (e.g. a plugin's import traceback)"
    )


def run_config(args: argparse.Namespace) -> Any:
    """The RunConfig of `kvcompare run`'s arguments: the preset's values, then the flags given. Raises ConfigError."""
    from kvcompare.config import ConfigError, RunConfig

    preset = PRESETS.get(args.preset or "", {})
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in given.items() if v is not None and v is not False}
    if "policies" in values and not values["policies"]:
        raise ConfigError("--policies is empty: name at least one policy (see `kvcompare policies`), or full")
    if "ratios" in values and "cache_sizes" in values:
        raise ConfigError("--cache and --ratio both set the budget: give one (--ratio 0.5 keeps half of each context)")
    merged = {**preset, **values}
    if "ratios" in values:  # budgets by ratio replace the limits (the preset's included)
        merged["cache_sizes"] = []
    if "lengths" in values and "samples" not in values and "samples" in preset:
        # The preset's counts belong to its own lengths: keep a length's count where the preset has that
        # length, else its first (shortest) length's count, rather than fail on a --samples nobody gave.
        by_length = dict(zip(preset["lengths"], preset["samples"], strict=True))
        merged["samples"] = [by_length.get(n, preset["samples"][0]) for n in values["lengths"]]
    merged["baseline"] = not args.no_baseline
    merged["all_books"] = args.all_books
    merged["query_aware"] = args.query_aware
    return RunConfig(**merged)


def cmd_run(args: argparse.Namespace) -> int:
    """``kvcompare run``: measure the grid (or with ``--dry-run`` print its plan), then print the summary and build the
    report; exit status 1 when no cell succeeded, or only the `full` baseline did (nothing was compared)."""
    from kvcompare.run.runner import run

    config = run_config(args)
    if args.dry_run:
        from kvcompare.run.estimate import dry_run

        print(dry_run(config, args.out, resume=args.resume, force=args.force))
        return 0
    folder = run(config, args.out, resume=args.resume, force=args.force, progress=not args.quiet)
    from kvcompare.analysis import load_run, outcome
    from kvcompare.report import build_report, summary_table
    from kvcompare.report.build import FAILED_HINT

    print(summary_table(folder))
    print(f"\nresults: {folder}/cells/*.parquet (polars.read_parquet), run.json beside them")
    if not args.no_report:
        paths = build_report(folder)
        print(f"report:  {paths.html} and {paths.markdown}")
    ended = outcome(load_run(folder))
    if ended.nothing_succeeded:
        print(f"kvcompare: no cell succeeded ({ended.failed} failed): {FAILED_HINT}", file=sys.stderr)
        return 1
    if ended.nothing_compared:
        failed = f"{ended.compared_failed} failed; only the `full` baseline succeeded"
        print(f"kvcompare: every compared cell failed ({failed}): {FAILED_HINT}", file=sys.stderr)
        return 1
    return 0


def _silence_library_progress_bars() -> None:
    """--quiet also silences the libraries' own bars (GGUF conversion, weights loading, downloads).

    Set before tqdm and transformers are imported: tqdm reads ``TQDM_DISABLE`` when it is imported.
    """
    import os

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_report(args: argparse.Namespace) -> int:
    """``kvcompare report``: build the report of a results folder."""
    from kvcompare.report import build_report

    paths = build_report(args.run_dir, args.out)
    print(f"report: {paths.html} and {paths.markdown}")
    return 0


def _print_parameters(cls: type) -> None:
    from kvcompare.parameters import parameter_defaults, parameter_help, parameter_types, shown_type, shown_value

    defaults, helps = parameter_defaults(cls), parameter_help(cls)
    for key, kind in parameter_types(cls).items():
        default = defaults[key]
        shown = f"{key}: {shown_type(kind)} = {shown_value(default) if isinstance(default, tuple) else repr(default)}"
        print(f"    {shown}" + (f"  {helps[key]}" if helps[key] else ""))
    if not defaults:
        print("    (no parameters)")


def _list_registered(registry: Any, syntax: str, request: bool = False) -> int:
    """Each class of a registry with its plugin (core or built-in ones said so; and request kind), its docstring's
    first paragraph and its parameters."""
    from kvcompare.plugins import get_host

    infos = get_host().infos
    for name in registry.names():
        entry = registry.entry(name)
        doc = " ".join((entry.cls.__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
        origin = infos[entry.plugin].origin if entry.plugin in infos else ""
        kind = (f", {origin}" if origin else "") + (f"; request: {entry.cls.request}" if request else "")
        print(f"{name}  (plugin: {entry.plugin}{kind})\n    {doc}")
        if note := getattr(entry.cls, "prefill_setting", ""):
            print(f"    prefill setting: {' '.join(note.split())}")
        _print_parameters(entry.cls)
    print(f"\nSyntax: {syntax}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    """``kvcompare policies``: each registered policy with its plugin, parameters and defaults."""
    from kvcompare.plugins import get_registry

    return _list_registered(get_registry(), POLICY_SYNTAX)


def cmd_tasks(args: argparse.Namespace) -> int:
    """``kvcompare tasks``: each registered task with its plugin, request kind, parameters and defaults."""
    from kvcompare.plugins import get_tasks

    return _list_registered(get_tasks(), TASK_SYNTAX, request=True)


def cmd_plugins(args: argparse.Namespace) -> int:
    """``kvcompare plugins``: each loaded plugin and its version; exit status 1 if one failed to load."""
    from kvcompare.plugins import get_host

    host = get_host()
    host.registry()
    for info in host.plugins():
        version = f"{info.distribution} {info.version}".strip() or "registered in-process"
        version += f" ({info.origin})" if info.origin else ""
        print(f"{info.name:16} {version:24} {info.module}")
    for failure in host.failures:
        print(f"{failure.name:16} FAILED: {failure.error}")
    return 1 if host.failures else 0


def main(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv`` (default ``sys.argv``), set the message level and run the command; a user's
    error is one line and exit status 2."""
    parser = argparse.ArgumentParser(prog="kvcompare", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    _add_run_parser(commands)
    report = commands.add_parser("report", help="build tables, charts and HTML/Markdown from a results folder")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/report)")
    commands.add_parser("policies", help="list policies with their parameters, defaults and plugin")
    commands.add_parser("tasks", help="list tasks with their parameters, defaults and plugin")
    commands.add_parser("plugins", help="list plugins and their versions")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    quiet = getattr(args, "quiet", False)
    if quiet:
        _silence_library_progress_bars()
    from kvcompare.logs import configure, level_for

    configure(level_for(quiet, getattr(args, "verbose", 0)))
    handlers = {
        "run": cmd_run,
        "report": cmd_report,
        "policies": cmd_policies,
        "tasks": cmd_tasks,
        "plugins": cmd_plugins,
    }
    from kvcompare.errors import KVCompareError

    try:
        return handlers[args.command](args)
    except KVCompareError as err:
        print(f"kvcompare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
