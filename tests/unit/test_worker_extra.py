"""Worker commands where only the client is installed say how to install the worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """\
import importlib.abc, sys
BLOCKED = set(sys.argv.pop(1).split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from sdqueue.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(blocked: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "producer"), str(ROOT / "worker")])}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, blocked, *argv], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("blocked", ["torch,diffusers,transformers", "sdqueue_worker"])
@pytest.mark.parametrize("command", [["worker"], ["build-tiny-model", "unused-path"]])
def test_worker_commands_without_the_worker_extra(blocked: str, command: list[str], tmp_path: Path) -> None:
    done = run_cli(blocked, *command)
    assert done.returncode == 1, done.stderr
    assert 'pip install "sdqueue[worker]"' in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "unused-path").exists()


def test_client_commands_work_without_the_worker_extra() -> None:
    done = run_cli("torch,diffusers,transformers,sdqueue_worker", "schema")
    assert done.returncode == 0, done.stderr
    assert '"txt2img"' in done.stdout
