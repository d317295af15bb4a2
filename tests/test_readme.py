"""The README and the code agree on the protocol."""

from pathlib import Path

from kvcompare.protocol import PROTOCOL_MD

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_states_the_protocol_the_reports_state() -> None:
    assert PROTOCOL_MD in README.read_text()


def test_readme_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert "kvcompare run" in lines[3] and "python -m pytest" in lines[4]
