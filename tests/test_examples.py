"""The README's example runs as written, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "workflow.py"


def test_workflow_example_runs_and_reads_zero_copy():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "names: ['run1/temps/0', 'run1/temps/1', 'run1/temps/2']" in out.stdout
    assert "zero-copy True" in out.stdout
    assert "Traceback" not in out.stderr
