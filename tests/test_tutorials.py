"""The tutorials as shipped: safe to Run All, outputs a real run would give, test markers out of sight.

nbval runs them (``pytest notebooks --nbval``, see notebooks/conftest.py, which also
fails a Vertex AI tutorial that leaves an endpoint deployed after its last cell);
these tests read the files themselves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
VERTEX = [path for path in NOTEBOOKS if path.name.startswith("vertex_")]
#: The cell tags nbval reads (nbval/plugin.py's ``metadata_tags``), and the one the tutorials use.
NBVAL_TAGS = {"nbval-ignore-output", "nbval-check-output", "nbval-raises-exception", "nbval-skip",
              "raises-exception"}


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    return "".join(output.get("data", {}).get("text/plain", ""))


def _submits(source: str) -> bool:
    """A code cell that starts a billed job: a tune() that is no dry run (and no expected mistake), or a deploy."""
    if "try:" in source:
        return False
    return bool(re.search(r"\btm\.tune\(", source)) and "dry_run=True" not in source or ".deploy(" in source


def test_there_are_tutorials():
    assert {"quickstart.ipynb", "vertex_open_model_sft.ipynb"} <= {p.name for p in NOTEBOOKS} and len(VERTEX) == 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_test_markers_are_cell_tags_and_no_run_leaves_its_timestamps(path):
    for cell in _cells(path):
        assert "NBVAL_" not in _source(cell), _source(cell)[:80]
        tags = set(cell.get("metadata", {}).get("tags", []))
        assert not {t for t in tags if t.startswith("nbval") or t == "raises-exception"} - NBVAL_TAGS, tags
        assert "execution" not in cell.get("metadata", {})


@pytest.mark.parametrize("path", VERTEX, ids=lambda p: p.name)
def test_a_vertex_tutorial_opens_with_its_settings_and_the_setup_check(path):
    code = [_source(c) for c in _cells(path) if c["cell_type"] == "code"]
    first = code[0]
    assert "tm.settings.update(project=PROJECT" in first and "staging_bucket=STAGING_BUCKET" in first
    assert "tm.check_setup()" in first and "BUCKET = setup.staging_bucket" in first
    assert not any("tuning_magics.settings.staging_bucket" in c or "tm.settings.staging_bucket" in c for c in code)


@pytest.mark.parametrize("path", VERTEX, ids=lambda p: p.name)
def test_a_vertex_tutorial_keeps_no_output_only_the_stand_ins_produce(path):
    for cell in _cells(path):
        if cell["cell_type"] != "code":
            continue
        if "nbval-ignore-output" in cell["metadata"].get("tags", []):
            assert cell["outputs"] == [], _source(cell)[:80]
        for output in cell["outputs"]:
            text = _text(output)
            assert not re.search(r"Answer [0-9a-f]{8} to:", text), text[:120]  # the fake's chat replies
            assert "queued for" not in text and "application/vnd.jupyter.widget-view+json" not in output.get("data", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_tutorial_shows_a_job_state_frozen_from_an_old_run(path):
    for cell in _cells(path):
        for output in cell.get("outputs", []):
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                assert "state: JOB_STATE" not in _text(output), _source(cell)[:80]


@pytest.mark.parametrize("path", VERTEX, ids=lambda p: p.name)
def test_each_cell_that_starts_a_billed_job_says_so_above_it(path):
    cells = _cells(path)
    found = 0
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and _submits(_source(cell)):
            found += 1
            above = next(_source(c) for c in reversed(cells[:i]) if c["cell_type"] == "markdown")
            assert re.search(r"\*\*This cell starts[^*]*bill", above), (_source(cell)[:80], above[-200:])
    assert found


def _deploys(path: Path) -> bool:
    return any(c["cell_type"] == "code" and ".deploy(" in _source(c) for c in _cells(path))


def test_the_open_model_tutorial_deploys():
    assert _deploys(FOLDER / "vertex_open_model_sft.ipynb")


@pytest.mark.parametrize("path", [p for p in VERTEX if _deploys(p)], ids=lambda p: p.name)
def test_a_tutorial_that_deploys_deletes_the_endpoint_in_its_last_cell(path):
    last = _cells(path)[-1]
    assert last["cell_type"] == "code"
    source = _source(last)
    # Guarded, so it runs after Run All and also when the deploy cells were skipped.
    assert source.startswith('if "endpoint" in globals():\n    endpoint.delete()'), source
    assert "nbval-ignore-output" not in last["metadata"].get("tags", [])
    assert [_text(o) for o in last["outputs"]] == ["DELETED\n"]
