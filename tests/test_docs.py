"""The documentation: every ```python block of docs/*.md and README.md runs, the site builds with
``mkdocs build --strict``, and the images the pages show exist and are drawn by docs/gen_plots.py.

A block is skipped only when the line before its fence is ``<!-- no-run: reason -->`` (needs CUDA, a
downloaded model, ...); skipped blocks must still compile. The blocks of one page run in order in one
namespace, as a reader would paste them, in a temporary working directory, with tests/ importable (the
diffusers page builds its pipeline from tests/tiny_pipelines.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(?P<reason>.*?)\s*-->$")
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+\.png)\)")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line number, code, no-run reason or None)`` for each ```python block of a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NO_RUN.match(before)
            blocks.append((start + 1, "\n".join(lines[start:end]), marker["reason"] if marker else None))
            i = end
        i += 1
    return blocks


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own, under numpy 2
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    # a real module, as a pasted script has: torch.compile looks functions' globals up through sys.modules
    module = types.ModuleType(f"kdpm2_docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for line, code, reason in python_blocks(page):
        compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
        if reason is not None:
            assert len(reason) > 10, f"{page.name}:{line}: a no-run marker needs a real reason"
            continue
        exec(compiled, module.__dict__)


def test_the_no_run_marker_is_seen(tmp_path):
    sample = "text\n\n<!-- no-run: needs a CUDA device -->\n```python\nimport torch\n```\n\n```python\nx = 1\n```\n"
    path = tmp_path / "probe.md"
    path.write_text(sample, encoding="utf-8")
    found = [(code, reason) for _, code, reason in python_blocks(path)]
    assert found == [("import torch", "needs a CUDA device"), ("x = 1", None)]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_images_exist_are_small_and_are_what_gen_plots_draws(tmp_path):
    shown = {match["path"] for page in PAGES for match in IMAGE.finditer(page.read_text(encoding="utf-8"))}
    assert shown, "the pages show no images"
    for relative in shown:
        path = ROOT / "docs" / relative
        assert path.is_file(), f"{relative} is shown but missing"
        width, height = _png_size(path)
        assert width > 100 and height > 100 and path.stat().st_size < 100_000
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("gen_plots", ROOT / "docs" / "gen_plots.py")
    gen_plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_plots)
    drawn = {f"img/{path.name}" for path in gen_plots.main(["--out", str(tmp_path)])}
    assert drawn == {relative for relative in shown if relative.startswith("img/")}


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    for name in ("KDPM2DiscreteScheduler", "set_timesteps", "make_plan", "get_backend"):  # generated from docstrings
        assert name in reference, f"the API reference lacks {name}"
    options = (tmp_path / "site" / "options" / "index.html").read_text(encoding="utf-8")
    assert "img/sigma_families.png" in options


def test_documented_schedule_output_is_what_the_command_prints():
    click_testing = pytest.importorskip("click.testing")
    from kdpm2core.cli import cli

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    examples = re.findall(r"```text\n\$ kdpm2 (schedule[^\n]*)\n(.*?)```", text, flags=re.S)
    assert examples, "docs/cli.md shows no kdpm2 schedule output"
    for command, shown in examples:  # the schedule depends on nothing but the options: no times, no versions
        result = click_testing.CliRunner().invoke(cli, command.split())
        assert result.exit_code == 0, result.output
        assert result.stdout == shown, f"docs/cli.md shows other output for 'kdpm2 {command}'"
