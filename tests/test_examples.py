"""The README's example runs as written, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, timeout: float) -> subprocess.CompletedProcess:
    """``python examples/<name>`` in a process of its own; it must exit 0."""
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out


def test_workflow_example_runs_and_reads_zero_copy():
    out = run_example("workflow.py", 180)
    assert "names: ['run1/temps/0', 'run1/temps/1', 'run1/temps/2']" in out.stdout
    assert "zero-copy True" in out.stdout
    assert "Traceback" not in out.stderr


def test_datasets_example_runs_as_the_readme_shows():
    out = run_example("datasets.py", 300)
    assert "same sum True" in out.stdout
    assert "row 150 [150. 150. 150.] row 250 [-1. -1. -1.]" in out.stdout
    assert "names ['run1/field', 'run1/grid'] True (2000, 1000)" in out.stdout
    assert "zero-copy True strided [[0.0, 0.0], [100.0, 100.0], [-1.0, -1.0], [300.0, 300.0]]" in out.stdout
