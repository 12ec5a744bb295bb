"""The notebooks in notebooks/ run top to bottom without an error, each from a clean kernel.

They run in their quick mode (NOTEBOOK_QUICK=1: a few training steps, little text, few samples), so the test checks
that every cell works with the project's current code, not the numbers the committed outputs show (those come from
full runs: see the first cell of each notebook). Their work directory is private to the test session and shared by
the notebooks, as out-notebooks/ is outside the tests: the sample is prepared once, and a small model that one
notebook trained is used by the next as it would be for a user (nbutil.find_data and nbutil.train_small).
"""
import os

import pytest

from conftest import HAVE_SHARED_SAMPLE, ROOT, SHARED

SAMPLE_DIR = SHARED / "data" / "tinystories-sample"

NOTEBOOKS = ["tokenization", "model", "training", "evaluation"]


@pytest.fixture(scope="session")
def notebook_work(tmp_path_factory):
    """NOTEBOOK_WORK of the notebooks of this test session (of this worker, under pytest -n)."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_work, monkeypatch, hf_home):
    if not os.environ.get("CI"):
        if not HAVE_SHARED_SAMPLE:  # the notebooks read ../shared themselves, not the tests' own corpus
            pytest.skip(f"needs the TinyStories sample at {SAMPLE_DIR} (the notebooks would prepare or download "
                        f"data)")
        pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("NOTEBOOK_WORK", str(notebook_work))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # from a clean state: nothing of the committed run is kept
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no picture"
