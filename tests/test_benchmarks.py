"""The benchmark runner's plumbing (its figures are never asserted in tests: the machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_ROWS = [
    *("--skip", "small", "--skip", "large", "--skip", "ancestral"),
    *("--skip", "set_timesteps", "--skip", "flow", "--skip", "cold", "--skip", "jax"),
]


def test_no_page_faults_reruns_under_the_glibc_tunables(tmp_path):
    output = tmp_path / "run.json"
    command = [sys.executable, "-m", "benchmarks", "--no-page-faults", *NO_ROWS, "--output", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    tunables = result["machine"]["glibc_tunables"] or ""
    assert "glibc.malloc.mmap_threshold=" in tunables and "glibc.malloc.trim_threshold=" in tunables
    assert result["rows"] == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 deprecations
def test_substep_targets_are_judged_on_torch_cpu_only():
    from benchmarks import run

    # the issue sets the substep targets for torch CPU: on a GPU they are shown, not judged
    judged = run.row("substep", [2.0], [4.0], 0.33)
    shown = run.row("substep", [2.0], [4.0], 0.33, judged=False)
    assert judged["ok"] is False and shown["ok"] is None and shown["target"] == judged["target"] == "<= 0.33"
    lines = run.table([judged, shown]).splitlines()
    assert lines[2].endswith("NO") and lines[3].endswith("-") and "torch CPU" in lines[4]
    assert "torch CPU" not in run.table([judged])
    # a real CPU run (a tiny latent, one round) is judged; its memory-floor rows are shown, not judged
    rows = run.substep_rows((1, 4, 8, 8), "cpu", 1, floor=True)
    assert [r["ok"] is None for r in rows] == [False, True, True]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ancestral_row_runs_both_classes_with_a_generator():
    """The DPM2 a row times ours against diffusers' KDPM2AncestralDiscreteScheduler; shown, not judged."""
    from benchmarks import run

    (row,) = run.substep_rows((1, 4, 8, 8), "cpu", 1, floor=False, ancestral=True)
    assert row["benchmark"].startswith("substep DPM2 a") and row["ok"] is None and row["ratio"] > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_flow_row_is_shown_not_judged():
    from benchmarks import run

    flow = run.flow_row(1)
    assert flow["ok"] is None and flow["target"] is None and flow["ours"] > 0 and flow["reference"] > 0
