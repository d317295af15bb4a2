"""Messages: library modules log (never print); the CLI's --quiet and -v choose what is shown; a message never
breaks a progress bar."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from tqdm import tqdm

from kvcompare.cli import main
from kvcompare.logs import NORMAL, QUIET, VERBOSE, configure, configured_level, level_for

PACKAGE = Path(__file__).resolve().parents[1] / "kvcompare"
#: The command line is where output is presented; everything below it logs.
PRESENTATION = {PACKAGE / "cli.py"}

log = logging.getLogger("kvcompare.test")


def _prints(path: Path) -> list[int]:
    """Lines of `path` that call print() or traceback.print_exc()."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in {"print", "print_exc", "print_exception"}:
                lines.append(node.lineno)
    return lines


def test_library_code_logs_and_never_prints() -> None:
    printing = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in PRESENTATION and (found := _prints(path))
    }
    assert not printing, f"library modules print instead of logging: {printing}"


@pytest.mark.parametrize(
    ("quiet", "verbose", "level"), [(False, 0, NORMAL), (True, 0, QUIET), (False, 1, VERBOSE), (True, 2, QUIET)]
)
def test_flags_map_to_levels(quiet: bool, verbose: int, level: int) -> None:
    assert level_for(quiet, verbose) == level


@pytest.mark.parametrize(
    ("level", "shown"),
    [(QUIET, ["kvcompare: warning: w", "kvcompare: error: e"]), (NORMAL, ["kvcompare: i"]), (VERBOSE, ["d"])],
)
def test_a_level_shows_what_it_should(level: int, shown: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    configure(level)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    err = capsys.readouterr().err
    assert all(line in err for line in shown)
    assert ("kvcompare: d" in err) == (level <= VERBOSE)
    assert ("kvcompare: i" in err) == (level <= NORMAL)
    assert configured_level() == level


def test_configure_twice_shows_each_message_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure(NORMAL)
    configure(NORMAL)
    log.warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_a_message_is_written_above_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    bar = tqdm(total=3, desc="passes", file=sys.stderr, ascii=True)
    bar.update(1)
    log.warning("between")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    # The message has a line of its own: the bar is cleared before it and redrawn after it.
    assert "\nkvcompare: warning: between\n" in err.replace("\r", "\n")


@pytest.mark.parametrize(("flags", "level"), [([], NORMAL), (["--quiet"], QUIET), (["-v"], VERBOSE)])
def test_run_flags_set_the_level(flags: list[str], level: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *flags, "--policies", ""]) == 2  # refused at once, after the flags took effect
    assert configured_level() == level
    assert "kvcompare: error: --policies is empty" in capsys.readouterr().err
