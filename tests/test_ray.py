"""Runs on Ray (a local cluster started by the run, 2 CPU workers, tiny models): the same rows as a serial run,
workers that die, cells that fail, and --resume across them. Marked `ray` (each run starts a cluster)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from runs import CORPUS, tiny_run

from kvcompare.config import ConfigError
from kvcompare.hookspecs import hookimpl
from kvcompare.run.runner import run
from kvcompare.testing import DiesInWorker, RaisesAtEviction

QUALITY = ["cell_id", "status", "ppl", "accuracy", "nll_sum", "tokens_scored", "peak_kv_bytes"]


class MisbehavingPolicies:
    @hookimpl
    def register_policies(self, register: Callable[[type], None]) -> None:
        register(DiesInWorker)
        register(RaisesAtEviction)


def grid(model_dir: Path, **changes: object):  # type: ignore[no-untyped-def]
    """Three passages; one thread everywhere, so that serial and Ray rows can be compared bit for bit (two
    threads may sum in another order than one)."""
    values: dict[str, object] = {
        "policies": ["streaming", "l2"],
        "cache_sizes": [16],
        "samples": [3],
        "repeats": 1,
        "threads": 1,
    }
    return tiny_run(model_dir, **{**values, **changes})


def cells(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "cells" / "*.parquet").sort("cell_id")


@pytest.fixture
def misbehaving(register_plugin: Callable[[object, str], None]) -> None:
    register_plugin(MisbehavingPolicies(), "misbehaving")


@pytest.mark.ray
def test_a_ray_run_gives_the_rows_of_a_serial_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    serial = cells(run(grid(tiny_model_dir), tmp_path / "serial", progress=False))
    on_ray = cells(run(grid(tiny_model_dir, ray="local", workers=2), tmp_path / "ray", progress=False))
    assert on_ray.height == serial.height == 9  # 3 passages x (full, streaming, l2)
    assert on_ray.select(QUALITY).equals(serial.select(QUALITY))
    assert on_ray["host"].drop_nulls().len() == 9 and on_ray["device_name"].str.starts_with("CPU").all()
    assert len(list((tmp_path / "ray" / "timings").glob("*.parquet"))) == 3  # one per passage, as serial
    import json

    meta = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert len(meta["speed"]["ray"]["workers"]) == 2 and meta["finished_at"] and meta["config"]["ray"] == "local"


@pytest.mark.ray
def test_a_worker_that_dies_is_restarted_and_its_passage_measured_again(
    tiny_model_dir: Path, tmp_path: Path, misbehaving: None
) -> None:
    pytest.importorskip("ray")
    tally = tmp_path / "deaths"
    spec = f"dies:tally={tally}:times=1"
    on_ray = cells(run(grid(tiny_model_dir, policies=[spec], ray="local", workers=2), tmp_path / "ray", progress=False))
    assert len(tally.read_text().splitlines()) == 1  # one process died, in the middle of a passage
    assert on_ray["status"].to_list() == ["ok"] * 6
    serial = cells(run(grid(tiny_model_dir, policies=[spec]), tmp_path / "serial", progress=False))
    assert on_ray.select(QUALITY).equals(serial.select(QUALITY))


@pytest.mark.ray
def test_a_worker_that_keeps_dying_fails_its_passage_and_resume_measures_it(
    tiny_model_dir: Path, tmp_path: Path, misbehaving: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    from kvcompare.run.distributed import RETRIES

    tally = tmp_path / "deaths"
    spec = f"dies:tally={tally}:times={RETRIES + 1}"  # every try of the first passage dies
    out = tmp_path / "run"
    first = cells(run(grid(tiny_model_dir, policies=[spec], ray="local", workers=1), out, progress=False))
    assert len(tally.read_text().splitlines()) == RETRIES + 1
    assert first["status"].to_list() == ["failed"] * 2  # the first passage's two cells; no worker was left
    assert first["error"].str.contains("Ray worker failed").all()
    assert "passage(s) not measured" in capsys.readouterr().err
    resumed = cells(run(grid(tiny_model_dir, policies=[spec]), out, resume=True, progress=False))
    assert resumed["status"].to_list() == ["ok"] * 6
    serial = cells(run(grid(tiny_model_dir, policies=[spec]), tmp_path / "serial", progress=False))
    assert resumed.select(QUALITY).equals(serial.select(QUALITY))


@pytest.mark.ray
def test_a_failing_cell_on_ray_is_recorded_and_the_others_kept(
    tiny_model_dir: Path, tmp_path: Path, misbehaving: None
) -> None:
    pytest.importorskip("ray")
    rows = cells(run(grid(tiny_model_dir, policies=["raises", "streaming"], ray="local"), tmp_path, progress=False))
    failed = rows.filter(pl.col("status") == "failed")
    assert failed["policy"].unique().to_list() == ["raises"] and failed.height == 3
    assert failed["error"].str.contains("bug in the policy").all()
    assert failed["traceback"].str.contains(r'testing.py", line \d+, in score').all()  # the policy's own frame
    assert rows.filter(pl.col("status") == "ok").height == 6


@pytest.mark.ray
def test_a_users_error_inside_an_actor_is_one_line_with_exit_status_2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    import shutil

    from kvcompare.cli import main

    broken = tmp_path / "model"  # its config and tokenizer load (the plan passes), its weights do not
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = ["run", "--model", str(broken), "--dataset", str(CORPUS), "--policies", "recent", "--cache", "16"]
    args += ["--lengths", "48", "--stride", "8", "--skip-layers", "0", "--ray", "local", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvcompare")]
    assert len(ours) == 1 and ours[0].startswith("kvcompare: error: could not load the model folder")
    assert "\x1b[" not in ours[0] and "Traceback" not in ours[0]


def test_ray_needs_its_extra_and_workers_need_ray(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="--workers sets the Ray actors"):
        run(grid(tiny_model_dir, workers=2), tmp_path / "a", progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'kvcompare\[ray\]'"):
        run(grid(tiny_model_dir, ray="local"), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "cells").exists()


@pytest.mark.ray
def test_ctrl_c_on_a_ray_run_keeps_finished_passages_and_resume_completes_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    import kvcompare.run.runner as runner

    real = runner.write_results
    written = {"passages": 0}

    def interrupted_after_one(folder, results):  # type: ignore[no-untyped-def]
        if written["passages"] == 1:
            raise KeyboardInterrupt
        written["passages"] += 1
        return real(folder, results)

    monkeypatch.setattr(runner, "write_results", interrupted_after_one)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(grid(tiny_model_dir, ray="local", workers=2), out, progress=False)
    assert cells(out).height == 3  # the first passage back, whole
    import ray

    assert not ray.is_initialized()  # the cluster this run started is stopped
    monkeypatch.setattr(runner, "write_results", real)
    resumed = cells(run(grid(tiny_model_dir, ray="local", workers=2), out, resume=True, progress=False))
    serial = cells(run(grid(tiny_model_dir), tmp_path / "serial", progress=False))
    assert resumed.select(QUALITY).equals(serial.select(QUALITY))


def test_actors_that_the_cluster_cannot_hold_are_refused() -> None:
    from kvcompare.run.distributed import check_cluster_fits

    check_cluster_fits({"CPU": 2.0}, 2, {"num_cpus": 1, "num_gpus": 0})
    with pytest.raises(ConfigError, match="--workers 3 with 1 CPU each need 3 CPUs, and the Ray cluster has 2"):
        check_cluster_fits({"CPU": 2.0}, 3, {"num_cpus": 1, "num_gpus": 0})
    with pytest.raises(ConfigError, match="need 2 GPUs, and the Ray cluster has 1: ask for fewer --workers, or add"):
        check_cluster_fits({"CPU": 16.0, "GPU": 1.0}, 2, {"num_cpus": 1, "num_gpus": 1})


@pytest.mark.ray
@pytest.mark.parametrize("workers,threads", [(3, None), (2, 2)])
def test_a_local_cluster_with_fewer_cpus_than_asked_is_refused_not_waited_on(
    tiny_model_dir: Path, tmp_path: Path, workers: int, threads: int | None
) -> None:
    pytest.importorskip("ray")
    import os

    cpus = os.cpu_count() or 1
    workers = max(workers, cpus + 1) if threads is None else workers
    threads = None if threads is None else max(threads, cpus // workers + 1)
    with pytest.raises(ConfigError, match=rf"--workers {workers} .* the Ray cluster has {cpus}:"):
        run(grid(tiny_model_dir, ray="local", workers=workers, threads=threads), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
