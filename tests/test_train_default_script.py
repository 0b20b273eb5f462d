"""tools/train_default.sh builds the shipped model in over two hours, so no test runs it. What can break without
anyone noticing until a rebuild fails an hour in is a flag: this checks that every command in the script names
one of the project's tools and passes it flags that tool's parser accepts."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train_default.sh"
VALUES = {"THREADS": "2", "WORK": "runs/w", "OUT": "runs/o", "SUPERVISED": "runs/w/model"}


class Parsed(Exception):
    """Raised in place of running a tool once its command line has parsed."""


def _commands(text: str) -> list[list[str]]:
    text = text.replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [shlex.split(re.sub(r"\$(\w+)", lambda m: VALUES[m.group(1)], line))[1:]
            for line in lines if line.startswith("python tools/")]


def _check(argv: list[str], monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    tool = importlib.import_module(f"dalle_tools.{Path(argv[0]).stem}")
    with pytest.raises(Parsed):
        tool.main(argv[1:])


def test_every_command_of_the_default_build_parses(monkeypatch):
    commands = _commands(SCRIPT.read_text())
    assert {Path(c[0]).stem for c in commands} == {"train_all", "feedback_loop", "bundle", "eval_feedback",
                                                    "eval_shapes", "eval_captions"}
    for argv in commands:
        _check(argv, monkeypatch)


def test_a_wrong_flag_in_the_script_would_fail(monkeypatch, capsys):
    """The check itself: the same commands with one flag misspelt are refused by the parser."""
    commands = _commands(SCRIPT.read_text().replace("--eval-n", "--eval-count"))
    bad = [c for c in commands if "--eval-count" in c]
    assert len(bad) == 1
    with pytest.raises(SystemExit):
        _check(bad[0], monkeypatch)
    assert "--eval-count" in capsys.readouterr().err


@pytest.mark.parametrize("script, first", [(SCRIPT, "Rebuild the default model"),
                                           (SCRIPT.parent / "gpu_check.sh", "The GPU check"),
                                           (SCRIPT.parents[1] / "benchmarks/peer/setup_venv.sh", "Builds the venv")])
def test_a_flag_never_starts_the_scripts_work(script, first, tmp_path):
    # `--help` (or a flag by mistake) must not start a build of hours, a GPU run, or make a venv named --help.
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "WORK": str(tmp_path / "w"), "OUT": str(tmp_path / "o"), "HOME": str(tmp_path)}
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env, timeout=30,
                           cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith(first) and "set -euo" not in shown.stdout
    wrong = subprocess.run(["bash", str(script), "--threads"], capture_output=True, text=True, env=env, timeout=30,
                           cwd=tmp_path)
    assert wrong.returncode == 2 and "(got: --threads)" in wrong.stderr and not wrong.stdout
    assert list(tmp_path.iterdir()) == []  # nothing made: no run, no venv
