"""The benchmark runner's plumbing (its figures are never asserted in tests: the machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_ROWS = ["--skip", "small", "--skip", "large", "--skip", "set_timesteps", "--skip", "cold", "--skip", "jax"]


def test_no_page_faults_reruns_under_the_glibc_tunables(tmp_path):
    output = tmp_path / "run.json"
    command = [sys.executable, "-m", "benchmarks", "--no-page-faults", *NO_ROWS, "--output", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    tunables = result["machine"]["glibc_tunables"] or ""
    assert "glibc.malloc.mmap_threshold=" in tunables and "glibc.malloc.trim_threshold=" in tunables
    assert result["rows"] == []
