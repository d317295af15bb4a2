"""Nothing lost, nothing mixed: `--force`, `--resume`, failed starts and per-cell independence (issue 7)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch
from runs import CORPUS
from runs import tiny_run as config

import kvcompare.run.passages as passages
import kvcompare.run.runner as runner
from kvcompare.cli import main
from kvcompare.config import ConfigError, RunConfig
from kvcompare.protocol import PROTOCOL_VERSION
from kvcompare.run.lock import FolderInUseError
from kvcompare.run.results import ResultsError, RunFolder
from kvcompare.run.runner import run


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is loaded: a refusal must come before the expensive part."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded despite input that could be refused before")

    monkeypatch.setattr(passages, "load_model", never)


def tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


# -- 1. --force deletes only what kvcompare wrote -------------------------------------------------------------
def test_force_refuses_a_folder_that_is_not_a_results_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "a.py").write_text("print('precious')\n")
    before = tree(project)
    with pytest.raises(ResultsError, match="did not write.*src"):
        run(config(tiny_model_dir), project, force=True, progress=False)
    assert tree(project) == before and (project / "src" / "a.py").read_text() == "print('precious')\n"


def test_force_refuses_a_results_folder_with_a_foreign_file_inside(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    (out / "cells" / "notes.txt").write_text("mine")
    with pytest.raises(ResultsError, match="cells/notes.txt"):
        run(config(tiny_model_dir), out, force=True, progress=False)
    assert (out / "cells" / "notes.txt").exists()


def test_force_checks_the_whole_configuration_before_touching_anything(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    with pytest.raises(ConfigError, match="skip-layers"):
        run(config(tiny_model_dir, skip_layers=[99]), out, force=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before


def test_force_replaces_a_results_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir, cache_sizes=[16, 24]), out, progress=False)
    run(config(tiny_model_dir), out, force=True, progress=False)
    assert pl.read_parquet(out / "cells" / "*.parquet").height == 2  # full + recent@16, the old @24 is gone


def test_force_and_resume_together_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    with pytest.raises(ResultsError, match="contradict"):
        run(config(tiny_model_dir), out, force=True, resume=True, progress=False)


# -- 2. a cell's numbers depend only on its own configuration -----------------------------------------------
@pytest.mark.parametrize("quality_batch", [1, None])
def test_a_random_policy_gives_the_same_cell_alone_and_in_a_grid(
    tiny_model_dir: Path, tmp_path: Path, quality_batch: int | None
) -> None:
    spec = {"policies": ["l2:mode=random"], "baseline": False, "lengths": [64], "quality_batch": quality_batch}
    grid = run(config(tiny_model_dir, cache_sizes=[16, 24], **spec), tmp_path / "grid", progress=False)
    alone = run(config(tiny_model_dir, cache_sizes=[24], **spec), tmp_path / "alone", progress=False)
    in_grid = pl.read_parquet(grid / "cells" / "*.parquet").filter(pl.col("cache_size") == 24).row(0, named=True)
    single = pl.read_parquet(alone / "cells" / "*.parquet").row(0, named=True)
    assert in_grid["cell_id"] == single["cell_id"]
    assert in_grid["accuracy"] == single["accuracy"]
    if quality_batch == 1:  # one pass per cell: bit for bit
        assert in_grid["nll_sum"] == single["nll_sum"]
    else:  # batch rows: the same random evictions, summed in another order (matrix products of more rows)
        assert in_grid["quality_batch"] == 2 and single["quality_batch"] == 1
        assert in_grid["nll_sum"] == pytest.approx(single["nll_sum"], rel=1e-6)


def test_every_cache_gets_a_fresh_policy_instance(tiny_model_dir: Path) -> None:
    from kvcompare.config import CacheConfig
    from kvcompare.engine.executor import Executor
    from kvcompare.plugins import get_registry
    from kvcompare.testing import tiny_llama

    policy = get_registry().build("l2:mode=random")
    executor = Executor(tiny_llama())
    first = executor.new_cache(policy, CacheConfig(8, 4), capacity=16)
    second = executor.new_cache(policy, CacheConfig(8, 4), capacity=16)
    assert first.policy is not policy and second.policy is not first.policy
    assert first.policy.params() == policy.params() and first.policy.plugin == policy.plugin == "l2"


# -- 3. --resume refuses a changed meaning, allows additions ------------------------------------------------
def test_resume_refuses_a_changed_setting_and_says_what_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    meta = (out / "run.json").read_text()
    with pytest.raises(ConfigError, match="gen: 2 then, 3 now"):
        run(config(tiny_model_dir, gen=3), out, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"cache_sizes: \[16\] would be dropped"):
        run(config(tiny_model_dir, cache_sizes=[24]), out, resume=True, progress=False)
    assert (out / "run.json").read_text() == meta


def test_resume_adds_cells_and_records_the_additions(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    run(config(tiny_model_dir, cache_sizes=[16, 24], samples=[2]), out, resume=True, progress=False)
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert {k: cells[k] for k in first} == first and len(cells) == 2 * 3
    meta = json.loads((out / "run.json").read_text())
    assert meta["resumes"][-1]["added"] == {"cache_sizes": [24], "samples_by_length": {"48": 2}}
    assert meta["cells_planned"] == 6 and meta["config"]["cache_sizes"] == [16, 24]


def refuse_resume_of_edited_run(tiny_model_dir: Path, out: Path, edit: Callable[[dict], None], match: str) -> None:
    """Finish a run, edit its run.json with ``edit``, and expect --resume to be refused with ``match``."""
    run(config(tiny_model_dir), out, progress=False)
    meta = json.loads((out / "run.json").read_text())
    edit(meta)
    (out / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=match):
        run(config(tiny_model_dir), out, resume=True, progress=False)


def test_resume_refuses_a_run_made_by_an_older_protocol(tiny_model_dir: Path, tmp_path: Path) -> None:
    def before_issue_9(meta: dict) -> None:  # what run.json held before issue 9
        del meta["config"]["repeats"], meta["config"]["prefill_chunk"]

    refuse_resume_of_edited_run(
        tiny_model_dir, tmp_path / "run", before_issue_9, "older kvcompare.*prefill_chunk, repeats"
    )


def test_resume_refuses_a_run_measured_under_another_protocol_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    def before_slot_reuse(meta: dict) -> None:  # run.json before slot reuse (issue 10) had no version: protocol 1
        del meta["protocol_version"]

    refuse_resume_of_edited_run(
        tiny_model_dir,
        tmp_path / "run",
        before_slot_reuse,
        f"measured under protocol 1, this kvcompare measures under protocol {PROTOCOL_VERSION}",
    )


# -- 4. a truncated cell file is kept aside and its cell measured again -------------------------------------
def test_resume_moves_an_unreadable_cell_aside_and_remeasures_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    victim = sorted((out / "cells").glob("*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    run(config(tiny_model_dir), out, resume=True, progress=False)
    kept = list((out / "quarantine").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(victim.name) and kept[0].read_bytes() == data[: len(data) // 2]
    assert pl.read_parquet(victim)["status"].to_list() == ["ok"]


# -- 4b. one run per folder: a folder in use is refused, a crashed run's lock is taken over (issue 34) ----------
def lock_record(pid: int, host: str | None = None) -> str:
    """run.lock as a run writes it: its owner's PID, host and start time."""
    import socket

    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started_at": "2025-01-02T03:04:05+00:00"})


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_in_use_by_another_run_is_refused_at_once(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, resume: bool
) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(lock_record(os.getpid()))  # as a run of this process holds it
    in_use = rf"--out {out} is in use by another kvcompare run \(PID {os.getpid()} on "
    with pytest.raises(FolderInUseError, match=in_use):
        run(config(tiny_model_dir), out, resume=resume, progress=False)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live process
    try:
        (out / "run.lock").write_text(lock_record(other.pid))
        before = snapshot(out)
        with pytest.raises(FolderInUseError, match=r"started 2025-01-02T03:04:05\+00:00\): wait for it to finish"):
            run(config(tiny_model_dir), out, resume=resume, progress=False)
        assert snapshot(out) == before  # nothing of the first run's folder changed
    finally:
        other.kill()
        other.wait()


def test_a_second_run_on_a_folder_being_written_is_refused_and_changes_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first run holds the folder from its start to its end; a second one, started while it measures, is
    refused with exit status 2 before it loads anything, and the first run finishes its own grid alone."""
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(CORPUS), "--lengths", "48", "--samples", "1"]
    args += ["--cache", "16", "--stride", "8", "--skip-layers", "0", "--policies", "recent", "--repeats", "1"]
    args += ["--warmup", "0", "--gen", "2", "--bucket", "16", "--out", str(out)]
    seen: list[int] = []
    real = runner.write_results

    def second_run_meanwhile(folder: RunFolder, results: passages.PassageResults) -> int:
        if not seen:  # once, while the first run writes
            before = snapshot(out)
            seen.append(-1)
            seen[0] = main([*args, "--gen", "3"])  # another grid, same folder
            assert snapshot(out) == before
        return real(folder, results)

    runner.write_results = second_run_meanwhile  # type: ignore[assignment]
    try:
        assert main(args) == 0
    finally:
        runner.write_results = real  # type: ignore[assignment]
    assert seen == [2]
    refusal = f"kvcompare: error: --out {out} is in use by another kvcompare run (PID {os.getpid()} on "
    assert refusal in capsys.readouterr().err
    assert not (out / "run.lock").exists()  # released at the end
    assert set(pl.read_parquet(out / "cells" / "*.parquet")["gen_tokens"]) == {2}


def test_a_crashed_runs_lock_is_taken_over_with_a_notice(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    run(config(tiny_model_dir), out, progress=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID names no process any more: the run that held the folder crashed
    (out / "run.lock").write_text(lock_record(gone.pid))
    run(config(tiny_model_dir, cache_sizes=[16, 24]), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"kvcompare: warning: {out} was held by a run that is gone (PID {gone.pid} on " in err
    assert "taking it over" in err
    assert not (out / "run.lock").exists() and len(list((out / "cells").glob("*.parquet"))) == 3


def test_a_lock_from_another_host_is_refused_with_what_to_do(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(lock_record(1, "elsewhere.example"))
    refusal = r"PID 1 on elsewhere\.example.*if that run is no longer running, remove .*run\.lock$"
    with pytest.raises(FolderInUseError, match=refusal):
        run(config(tiny_model_dir), out, progress=False)


def test_the_lock_is_released_on_every_exit_path(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError):  # refused after the folder was taken (the layer count): nothing is left
        run(config(tiny_model_dir, skip_layers=[99]), out / "deeper", progress=False)
    assert not out.exists()
    from kvcompare.engine.executor import Executor

    held: list[bool] = []

    def interrupt(*args: object, **kwargs: object) -> None:
        held.append((out / "run.lock").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(Executor, "score_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(config(tiny_model_dir), out, progress=False)
    assert held == [True]  # held while it measured, released by Ctrl-C
    assert (out / "run.json").exists() and not (out / "run.lock").exists()
    monkeypatch.undo()
    run(config(tiny_model_dir), out, progress=False)  # the interrupted run holds nothing
    assert not (out / "run.lock").exists() and len(list((out / "cells").glob("*.parquet"))) == 2


# -- 5. a failed start leaves nothing behind; a folder with no finished cell counts as empty -----------------
def test_a_failed_start_leaves_no_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError):
        run(config(tiny_model_dir, skip_layers=[99]), out, progress=False)
    assert not out.exists()
    run(config(tiny_model_dir), out, progress=False)  # the corrected command is not refused
    assert len(list((out / "cells").glob("*.parquet"))) == 2


def test_a_folder_without_finished_cells_is_reused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    from kvcompare.engine.executor import Executor

    real = Executor.score_batch
    monkeypatch.setattr(Executor, "score_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(config(tiny_model_dir), out, progress=False)
    assert (out / "run.json").exists() and not list((out / "cells").glob("*.parquet"))
    monkeypatch.setattr(Executor, "score_batch", real)
    run(config(tiny_model_dir), out, progress=False)
    assert len(list((out / "cells").glob("*.parquet"))) == 2


# -- 6. lengths beyond the trained context: allowed, warned, recorded ---------------------------------------
def test_lengths_beyond_the_trained_context_are_warned_and_recorded(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the tiny model has 4096 positions; shrink what the loader reports rather than build a long corpus
    real = passages.load_model

    def short_context(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        loaded = real(*args, **kwargs)  # type: ignore[arg-type]
        loaded.info["max_position_embeddings"] = 40
        return loaded

    monkeypatch.setattr(passages, "load_model", short_context)
    out = run(config(tiny_model_dir, lengths=[32, 48], samples=[1]), tmp_path / "run", progress=False)
    assert "lengths [48]" in capsys.readouterr().err
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    flags = dict(zip(cells["seq_len"], cells["beyond_context"], strict=True))
    assert flags == {32: False, 48: True} and set(cells["max_positions"]) == {40}
    assert json.loads((out / "run.json").read_text())["beyond_context_lengths"] == [48]


# -- 7. cheap checks come before the model load -------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,message",
    [
        ({"dataset": "/no/such/corpus.txt"}, "no such"),
        ({"skip_layers": [0, 0]}, "distinct"),
        ({"policies": []}, "no policies given"),
        ({"model": "/no/such/model"}, "no such file or folder"),
        ({"lengths": [100000]}, "longest"),  # needs only the tokenizer, not the weights
        ({"dtype": "float8"}, "unknown dtype"),
        ({"skip_layers": [0, 99]}, r"has layers 0\.\.3, not \[99\]"),  # the layer count is in config.json
        ({"skip_layers": [0, 1, 2, 3]}, "covers all 4 layers"),
    ],
)
def test_cheap_checks_run_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, changes: dict[str, object], message: str
) -> None:
    from kvcompare.corpus import CorpusError
    from kvcompare.models import ModelError

    with pytest.raises((ConfigError, CorpusError, ModelError), match=message):
        run(config(tiny_model_dir, **changes), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("layers", "suggested"), [(2, [0]), (1, [])])
def test_skipping_every_layer_suggests_a_skip_list_that_works_for_the_model(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, layers: int, suggested: list[int]
) -> None:
    import shutil

    from kvcompare.run.runner import check_start

    model = tmp_path / "model"  # the configuration and tokenizer alone: the check needs no weights
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    meta = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**meta, "num_hidden_layers": layers}))
    given = list(range(layers))  # [0, 1], the default, on two layers
    flag = ",".join(map(str, suggested)) or "none"
    refusal = rf"covers all {layers} layers .*; skip fewer layers \(--skip-layers {flag}\)$"
    with pytest.raises(ConfigError, match=refusal):
        check_start(config(model, skip_layers=given), tmp_path / "run")
    assert check_start(config(model, skip_layers=suggested), tmp_path / "run").grid.cells  # the suggestion works


def test_a_user_error_is_one_line_with_exit_status_2(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(CORPUS), "--skip-layers", "0,99"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["kvcompare: error: --skip-layers [0, 99]: the model has layers 0..3, not [99]"]


# -- 9. messages instead of tracebacks ----------------------------------------------------------------------
def test_out_that_is_a_file_is_refused(tiny_model_dir: Path, tmp_path: Path, no_measuring: None) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    with pytest.raises(ResultsError, match="is a file"):
        run(config(tiny_model_dir), target, progress=False)
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_a_read_only_out_is_refused(tiny_model_dir: Path, tmp_path: Path, no_measuring: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match="permission denied"):
            run(config(tiny_model_dir), locked / "run", progress=False)
    finally:
        locked.chmod(0o700)


def test_a_read_only_out_is_refused_by_its_access_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root passes the real chmod test above, so check the refusal through the access check it uses."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ResultsError, match="permission denied"):
        RunFolder(tmp_path / "run").check()


def test_a_policy_returning_none_is_named(tiny_model_dir: Path, tmp_path: Path, register_plugin) -> None:  # type: ignore[no-untyped-def]
    from kvcompare.hookspecs import hookimpl
    from kvcompare.policy import KVPolicy

    @dataclasses.dataclass
    class ReturnsNone(KVPolicy):
        name = "returns-none"

        def select(self, keys, keep, positions):  # type: ignore[no-untyped-def]
            return None

    @dataclasses.dataclass
    class EditsKeys(KVPolicy):
        name = "edits-keys"

        def select(self, keys, keep, positions):  # type: ignore[no-untyped-def]
            keys.mul_(0.5)  # in place: would silently change the model's cache
            return torch.arange(keep).expand(*keys.shape[:3], keep)

    class Plugin:
        @hookimpl
        def register_policies(self, register):  # type: ignore[no-untyped-def]
            register(ReturnsNone)
            register(EditsKeys)

    register_plugin(Plugin(), "odd-plugin")
    out = run(config(tiny_model_dir, policies=["returns-none", "edits-keys"]), tmp_path / "run", progress=False)
    failed = pl.read_parquet(out / "cells" / "*.parquet").filter(pl.col("status") == "failed")
    errors = dict(zip(failed["policy"], failed["error"], strict=True))
    assert "returned NoneType" in errors["returns-none"] and "odd-plugin" in errors["returns-none"]
    assert "changed the keys" in errors["edits-keys"] and "odd-plugin" in errors["edits-keys"]


# -- 10. the warm-up runs what the first timed cell runs ----------------------------------------------------
def test_the_warm_up_prefills_the_first_cells_whole_passage(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcompare.engine.executor import Executor

    calls: list[tuple[int, int, int]] = []
    real = Executor.generate

    def record(self, prompt, policy, cache, gen, warmup, prefill_chunk=None):  # type: ignore[no-untyped-def]
        calls.append((prompt.numel(), gen, warmup))
        return real(self, prompt, policy, cache, gen=gen, warmup=warmup, prefill_chunk=prefill_chunk)

    monkeypatch.setattr(Executor, "generate", record)
    run(config(tiny_model_dir, gen=3, warmup=1), tmp_path / "run", progress=False)
    assert calls[0] == (48, 3, 1)  # the untimed warm-up: the whole first passage, as many decode steps


# -- 8 and 11. the command line ------------------------------------------------------------------------------
def test_cli_refuses_an_empty_policy_list(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--policies", "", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")])
    assert code == 2 and "--policies is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_preset_with_other_lengths_needs_no_samples() -> None:
    import argparse

    from kvcompare.cli import run_config

    args = argparse.Namespace(
        **{f.name: None for f in dataclasses.fields(RunConfig)},
        preset="report",
        no_baseline=False,
    )
    args.lengths, args.all_books = [512, 5000], False
    assert run_config(args).samples == [10, 5]


def test_help_shows_the_default_grid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    defaults = RunConfig()
    assert f"cache limits {','.join(map(str, defaults.cache_sizes))}" in shown
    assert f"lengths {','.join(map(str, defaults.lengths))}" in shown and "streaming,l2,recent" in shown


def test_quiet_silences_the_transformers_progress_bars(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    monkeypatch.setenv("TQDM_DISABLE", "0")  # restored after the test
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setattr(runner, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    main(["run", "--quiet", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")])
    try:
        assert not hf_logging.is_progress_bar_enabled()
        assert os.environ["TQDM_DISABLE"] == "1"  # GGUF conversion uses a plain tqdm
    finally:
        hf_logging.enable_progress_bar()


def test_plugins_lists_a_rejected_plugin_only_as_failed(register_plugin, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from kvcompare.hookspecs import hookimpl

    class Broken:
        @hookimpl
        def register_policies(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("cannot register")

    register_plugin(Broken(), "broken-at-register")
    assert main(["plugins"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("broken-at-register")]
    assert len(lines) == 1 and "FAILED" in lines[0]


def test_the_default_folder_is_named_by_the_run_id(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = run(config(tiny_model_dir), progress=False)
    assert out.parent == Path("reports/runs")
    assert json.loads((out / "run.json").read_text())["run_id"] == out.name


# -- 12. a grid counts each cell once -----------------------------------------------------------------------------
def test_repeated_values_in_a_grid_are_measured_once_with_a_notice(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repeated = config(
        tiny_model_dir,
        policies=["recent", "recent", "l2", "l2:mode=keep_low"],
        cache_sizes=[16, 16],
        lengths=[48, 48],
        positions=["shift", "shift"],
        repeats=1,
    )
    out = run(repeated, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    for notice in (
        "--cache repeats 16",
        "--lengths repeats 48",
        "--positions repeats shift",
        "--policies repeats recent",
    ):
        assert f"kvcompare: {notice}: each is measured once" in err
    assert "--policies l2:mode=keep_low is l2, listed before: measured once" in err
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert cells.height == 3 and cells["cell_id"].n_unique() == 3  # full, recent and l2, once each
    meta = json.loads((out / "run.json").read_text())
    assert meta["cells_planned"] == 3 and meta["config"]["cache_sizes"] == [16] and meta["config"]["lengths"] == [48]
    from kvcompare.analysis import load_run

    assert load_run(out).cells.height == 3


def test_repeated_ratios_and_compression_settings_are_planned_once_with_a_notice(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcompare.run.runner import check_start

    once = {"cache_sizes": [], "ratios": [0.5], "compression": ["continuous", "prefill"], "policies": ["streaming"]}
    twice = {**once, "ratios": [0.5, 0.5], "compression": ["continuous", "prefill", "prefill"]}
    expected = check_start(config(tiny_model_dir, lengths=[96], **once), tmp_path / "a")
    repeated = check_start(config(tiny_model_dir, lengths=[96], **twice), tmp_path / "b")
    assert [c.id for c in repeated.grid.cells] == [c.id for c in expected.grid.cells]
    assert repeated.grid.metadata()["cells_planned"] == len(expected.grid.cells) == 4  # full and streaming, twice
    err = capsys.readouterr().err
    assert "kvcompare: --ratio repeats 0.5: each is measured once" in err
    assert "kvcompare: --compression repeats prefill: each is measured once" in err


def test_a_length_repeated_with_different_sample_counts_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--lengths gives 48 twice, with 1 and 2 samples: give it once"):
        run(config(tiny_model_dir, lengths=[48, 48], samples=[1, 2]), tmp_path / "run", progress=False)


# -- 13. refusals that say what is wrong (issue 20) ------------------------------------------------------------
def test_resume_of_a_folder_that_does_not_exist_is_refused(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None
) -> None:
    with pytest.raises(ResultsError, match=r"--resume: .*typo does not exist, so there is no run to continue"):
        run(config(tiny_model_dir), tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"policies": ["snapkv:window=8"], "cache_sizes": [16]},
            r"--cache 16: snapkv: window=8 is not below the 8 tokens an eviction keeps, .* would be `recent`",
        ),
        ({"policies": ["h2o:recent_ratio=1"]}, "recent_ratio=1 keeps no heavy hitter: that is `recent`"),
        (
            {"policies": ["streaming"], "cache_sizes": [128], "stride": 64, "layer_budget": "pyramid"},
            r"--cache 128: streaming: an eviction would keep only 3 tokens, not more than its start_size=4 "
            r"attention sinks \(an eviction keeps 3 tokens, from the smallest layer budget of --layer-budget "
            r"pyramid, 67 slots, --stride 64, --evict-block 1\): raise --cache, or lower --stride, or use "
            r"--layer-budget uniform or a lower beta",
        ),
    ],
)
def test_degenerate_policies_and_their_causes_are_named_before_the_model_loads(
    tiny_model_dir: Path, tmp_path: Path, no_measuring: None, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(config(tiny_model_dir, lengths=[256], **changes), tmp_path / "run", progress=False)


def test_resume_may_add_a_task_with_settings_no_finished_cell_depends_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run(config(tiny_model_dir, lengths=[200], repeats=1), tmp_path / "run", progress=False)  # ppl only
    more = config(tiny_model_dir, lengths=[200], repeats=1, tasks=["ppl", "passkey"], depths=[0.5], haystack="text")
    run(more, out, resume=True, progress=False)
    cells = pl.read_parquet(out / "cells" / "*.parquet")
    assert sorted(cells["task"].to_list()) == ["passkey", "passkey", "ppl", "ppl"]
    fewer = config(tiny_model_dir, lengths=[200], repeats=1, tasks=["ppl", "passkey"], depths=[0.7])
    expected = (
        r"add policies, cache limits, position modes, compression settings, tasks, needle depths, lengths "
        r"or samples. Differences: "
        r"haystack: 'text' then, 'repeat' now; depths: \[0.5\] would be dropped"
    )
    with pytest.raises(ConfigError, match=expected):
        run(fewer, out, resume=True, progress=False)  # now passkey cells depend on them


def test_threads_beyond_the_cpus_are_warned_at_start_and_in_the_report(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcompare.report.notices import load_notices

    cpus = os.cpu_count() or 1
    out = run(config(tiny_model_dir, threads=cpus + 2, repeats=1), tmp_path / "run", progress=False)
    warning = f"{cpus + 2} torch threads on {cpus} CPUs: threads beyond the CPUs wait for each other"
    assert f"kvcompare: warning: {warning}" in capsys.readouterr().err
    meta = json.loads((out / "run.json").read_text())
    assert any(warning in notice for notice in load_notices(meta))
    meta["speed"]["threads"] = cpus
    assert not any("torch threads" in notice for notice in load_notices(meta))


@pytest.mark.parametrize("load", [0.0, 4.4, 9.5])
def test_a_compiled_run_on_a_loaded_machine_is_warned_at_start(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    load: float,
) -> None:
    """Other work distorts compiled steps far more than eager ones: a --compile run whose 1-minute load average
    is more than an idle machine's half a CPU above the cores its threads leave free is warned before it starts
    (nothing is measured here)."""
    cpus = 8
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 1.0, 1.0))
    runner.check_start(config(tiny_model_dir, compile=True, threads=4), tmp_path / "run")
    err = capsys.readouterr().err
    said = "the 1-minute load average is 9.5, above the 4 CPUs the run's 4 threads leave free"
    assert ("compiled CPU steps suffer far more than eager ones" in err) == (load > 4.5), err
    assert (said in err) == (load == 9.5), err
    runner.check_start(config(tiny_model_dir, threads=4), tmp_path / "run")  # eager steps: the report warns
    assert "load average" not in capsys.readouterr().err
