"""`kvcompare run --dry-run`: the plan and its estimated time, from a calibration; nothing measured or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from runs import CORPUS

from kvcompare.cli import main
from kvcompare.run.estimate import Calibration, makespan


def test_a_chunked_pass_costs_its_tokens_and_the_context_they_attend() -> None:
    flat = Calibration(per_token=1.0, per_token_context=0.0, step=0.5, step_context=0.0)
    assert flat.chunks(10, 4, None) == pytest.approx(10.0)
    slope = Calibration(per_token=0.0, per_token_context=1.0, step=0.0, step_context=0.1)
    # chunks of 4 at contexts 0 and 4, a chunk of 2 at 8; each token also sees half its chunk on average
    assert slope.chunks(10, 4, None) == pytest.approx(4 * 2 + 4 * 6 + 2 * 9)
    # a limit of 6: the cache never holds more than 6 - chunk tokens before a chunk
    assert slope.chunks(10, 4, 6) == pytest.approx(4 * 2 + 4 * 4 + 2 * 5)
    assert slope.steps(3, 100) == pytest.approx(30.0)


def test_passages_spread_over_devices_longest_first() -> None:
    assert makespan([5, 4, 3, 3], 2) == 8
    assert makespan([5, 4, 3, 3], 1) == 15
    assert makespan([5], 4) == 5


def test_dry_run_prints_the_plan_and_an_estimate_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", "--dry-run", "--model", str(tiny_model_dir), "--dataset", str(CORPUS), "--policies", "streaming"]
    args += ["--cache", "16", "--lengths", "48,96", "--samples", "2", "--stride", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "plan: 8 cells to measure in 4 passages" in printed  # 2 lengths x 2 samples, each with full and streaming
    assert "| ppl | 96 | 2 |" in printed and "estimated time on one such device" in printed
    assert "on 2 such devices" in printed
    assert not out.exists()


def dry(model_dir: Path, out: Path, *more: str) -> list[str]:
    return [
        "run", "--model", str(model_dir), "--dataset", str(CORPUS), "--policies", "recent", "--cache", "16",
        "--lengths", "48", "--stride", "8", "--repeats", "1", "--gen", "2", "--warmup", "0", "--skip-layers", "0",
        "--out", str(out), "--no-report", "--quiet", *more,
    ]  # fmt: skip


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvcompare: error: "), lines
    return lines[0]


def test_a_dry_run_refuses_what_the_run_refuses_before_any_weights_load(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvcompare.run.passages

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded for a plan that is refused")

    monkeypatch.setattr(kvcompare.run.passages, "load_model", never)
    out = tmp_path / "run"
    assert main([*dry(tiny_model_dir, out, "--dry-run"), "--skip-layers", "0,99"]) == 2
    assert "has layers 0..3, not [99]" in one_error_line(capsys)
    out.mkdir()
    (out / "mine.txt").write_text("not kvcompare's")
    assert main([*dry(tiny_model_dir, out, "--dry-run"), "--force"]) == 2  # the folder the run would refuse
    assert "did not write" in one_error_line(capsys)
    assert main([*dry(tiny_model_dir, tmp_path / "none", "--dry-run"), "--resume", "--force"]) == 2
    assert "contradict" in one_error_line(capsys)


def test_a_dry_run_of_a_resume_plans_only_the_unfinished_cells(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(dry(tiny_model_dir, out)) == 0
    capsys.readouterr()
    assert main([*dry(tiny_model_dir, out, "--dry-run"), "--resume"]) == 0
    assert f"plan: nothing to measure; resuming {out}: 2 of 2 cells finished" in capsys.readouterr().out
    assert main([*dry(tiny_model_dir, out, "--dry-run"), "--resume", "--cache", "16,24"]) == 0
    assert f"plan: 1 cells to measure in 1 passages or prompts (resuming {out}: 2 of 3" in capsys.readouterr().out
    assert main([*dry(tiny_model_dir, out, "--dry-run")]) == 2  # neither --resume nor --force: the run refuses
    assert "--resume" in one_error_line(capsys)
    assert main([*dry(tiny_model_dir, out, "--dry-run"), "--resume", "--stride", "4"]) == 2
    assert "stride" in one_error_line(capsys)
