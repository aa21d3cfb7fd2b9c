"""The documentation covers what the code knows, and every command answers --help.

Every command and every variable is in invoicer(8) and in the README.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from invoicer.cli import _parser
from invoicer.config import KNOWN_VARIABLES
from tests.conftest import REPO

MANUAL = (REPO / "packaging" / "invoicer.8").read_text()
README = (REPO / "README.md").read_text()


def commands() -> list[str]:
    """The subcommands the command line knows."""
    parser = _parser()
    found = [action.choices for action in parser._actions if hasattr(action, "choices") and action.choices]
    return sorted(next(iter(found)))


def test_the_command_line_knows_the_commands_this_test_checks() -> None:
    assert commands() == ["bench", "failed", "rejected", "reload", "retry", "run", "submit"]


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_the_manual_and_the_readme(command: str) -> None:
    assert re.search(rf"^\.B[IR]? {command}\b", MANUAL, re.MULTILINE), f"invoicer(8) lacks {command}"
    assert f"invoicer {command}" in README, f"the README lacks invoicer {command}"


@pytest.mark.parametrize("variable", KNOWN_VARIABLES)
def test_every_variable_is_in_the_manual_and_the_readme(variable: str) -> None:
    assert re.search(rf"^\.B {variable}$", MANUAL, re.MULTILINE), f"invoicer(8) lacks {variable}"
    assert f"`{variable}" in README, f"the README's configuration lacks {variable}"


@pytest.mark.parametrize("variable", KNOWN_VARIABLES)
def test_every_variable_is_in_the_shipped_environment_file(variable: str) -> None:
    shipped = (REPO / "packaging" / "invoicer.default").read_text()
    assert re.search(rf"^#{variable}=", shipped, re.MULTILINE), f"packaging/invoicer.default lacks {variable}"


@pytest.mark.parametrize("command", commands())
def test_every_command_answers_help(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "invoicer", command, "--help"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: invoicer {command}")


def test_the_readme_stays_short_and_gives_the_ci_test_command() -> None:
    assert len(README.splitlines()) <= 300
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("apt-get update"))
    assert command in README
