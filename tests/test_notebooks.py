"""The educational notebooks run top to bottom (their cells assert what they teach)."""
import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cells = json.loads(path.read_text())["cells"]
    ns = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        try:
            exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)
        except Exception as e:  # name the cell that failed
            raise AssertionError(f"{path.name}: cell {i} failed: {type(e).__name__}: {e}\n{src}") from e
