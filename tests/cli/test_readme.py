"""The README's commands, read as a newcomer reads them: every extra a `pip install` names exists,
the set-up command installs what every shown command needs, and every `raymoe ...` line parses."""

import re
import subprocess
import sys
import shlex
import tomllib
from pathlib import Path

import pytest

from raymoe.cli import build_parser
from raymoe.extras import EXTRA_OF_MODULE
from raymoe.policies.cli import build_parser as plan_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[str]:
    """Every command of the bash blocks: continuations joined, split at `&&`, comments dropped."""
    out = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                command = command.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    out.append(command)
    return out


def installed_extras(command: str) -> set[str]:
    """The extras a `pip install` names: `.[a,b]`, `-e ".[a]"`, `'raymoe[a]'`."""
    return {e.strip() for group in re.findall(r"(?:\.|raymoe)\[([^\]]+)\]", command) for e in group.split(",")}


SETUP = next(c for c in shell_commands() if c.startswith("pip install"))


def test_every_named_extra_exists():
    named = set().union(*(installed_extras(c) for c in shell_commands() if "pip install" in c))
    named |= {e for group in re.findall(r"raymoe\[([^\]]+)\]", README) for e in group.split(",")}
    assert named and named <= set(EXTRAS), f"README names extras pyproject.toml lacks: {named - set(EXTRAS)}"
    assert set(EXTRA_OF_MODULE.values()) <= set(EXTRAS)


def test_setup_installs_what_every_shown_command_needs():
    needed = set()
    if any(shlex.split(c)[:2] == ["raymoe", "serve"] for c in shell_commands()):
        needed.add(EXTRA_OF_MODULE["ray"])
    for block in fenced("python"):
        for module in re.findall(r"^\s*(?:import|from)\s+(\w+)", block, flags=re.M):
            if module in EXTRA_OF_MODULE:
                needed.add(EXTRA_OF_MODULE[module])
    assert needed <= installed_extras(SETUP), f"the set-up command {SETUP!r} misses extras {needed}"


@pytest.mark.parametrize("command", [c for c in shell_commands() if c.startswith("raymoe ")])
def test_every_raymoe_command_parses(command):
    argv = shlex.split(command)[1:]
    if argv[0] == "plan":
        plan_parser().parse_args(argv[1:])
    else:
        build_parser().parse_args(argv)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    from raymoe.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--port", "1", "--log-level", "warning"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'ray' is missing" in err and "'.[serve]'" in err and "raymoe[serve]" in err
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; import raymoe.cluster"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert "ModuleNotFoundError: the Python package 'ray' is missing; it comes with raymoe's 'serve' extra" in proc.stderr
