"""`kvcompare run --dry-run`: the plan and its estimated time, from a calibration; nothing measured or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from runs import CORPUS

from kvcompare.cli import main
from kvcompare.estimate import Calibration, makespan


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
    assert "plan: 8 cells in 4 passages" in printed  # 2 lengths x 2 samples, each with full and streaming
    assert "| ppl | 96 | 2 |" in printed and "estimated time on one such device" in printed
    assert "on 2 such devices" in printed
    assert not out.exists()
