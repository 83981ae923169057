"""Notebook hygiene: stored without outputs, no stale counts or big images, Colab-safe first cell.

The notebooks themselves run under nbval as part of `pytest` (see pyproject's testpaths).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_ATTACHMENT = 100_000  # bytes of base64 per cell


def test_the_tutorials_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01-quickstart",
        "02-resume-after-restart",
        "03-branch-and-extend",
        "04-sft-chat",
        "05-your-own-data",
        "06-queue-and-pipelines",
        "07-lora-and-dpo",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    book = json.loads(path.read_text(encoding="utf-8"))
    assert book["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(book["cells"]):
        where = f"{path.name} cell {i}"
        size = len(json.dumps(cell.get("attachments", {})))
        assert size < MAX_ATTACHMENT, f"{where}: {size} bytes of attachments"
        if cell["cell_type"] != "code":
            continue
        assert cell["execution_count"] is None, f"{where}: stale execution count"
        assert cell["outputs"] == [], f"{where}: stored outputs (clear them before committing)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_only_on_colab(path):
    book = json.loads(path.read_text(encoding="utf-8"))
    first = next(c for c in book["cells"] if c["cell_type"] == "code")
    source = "".join(first["source"])
    assert '"google.colab" in sys.modules' in source and 'find_spec("mmnb") is None' in source


def test_readme_badges_point_at_the_notebooks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    binder = re.findall(r"https://mybinder\.org/v2/gh/[^)\s]+", readme)
    colab = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", readme)
    assert binder and colab
    for url in colab:
        assert (ROOT / url.split("/blob/main/", 1)[1]).is_file(), url
    for url in binder:
        target = url.split("labpath=", 1)[1] if "labpath=" in url else None
        assert target is None or (ROOT / target.replace("%2F", "/")).is_file(), url


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_leaves_no_temporary_folders(path):
    """A folder from mkdtemp outlives the kernel (/tmp/mmnb-tutorial-* piled up); a
    TemporaryDirectory is removed when the kernel exits."""
    book = json.loads(path.read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code")
    assert "mkdtemp(" not in code
