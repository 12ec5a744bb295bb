"""The notebooks in notebooks/ run top to bottom without an error, each from a clean kernel.

They run in their quick mode (NOTEBOOK_QUICK=1: a few training steps, little text, few samples), so the test checks
that every cell works with the project's current code, not the numbers the committed outputs show (those come from
full runs: see the first cell of each notebook). Their work directory is private to the test session and shared by
the notebooks, as out-notebooks/ is outside the tests: the sample is prepared once, and a small model that one
notebook trained is used by the next as it would be for a user (nbutil.find_data and nbutil.train_small). Each
runs with its kernel started in another place (WHERE): the first cell finds nbutil.py from any of them.

nbutil.gpt2_tokenizer, which the tokenization notebook compares GPT-2's vocabulary with, is tested here too: offline
it uses the vocabulary prepare.py copied into data it prepared with GPT-2's, and with nothing at hand its message
names the variable of the notebook's first cell to set.
"""
import os
import shutil
import sys

import pytest

from conftest import GPT2_RANKS, HAVE_SHARED_SAMPLE, ROOT, SHARED, needs_gpt2, run_script
from errors import UserError
from tokenizer import load_tokenizer

sys.path.insert(0, str(ROOT / "notebooks"))
import nbutil  # noqa: E402 (in notebooks/)

SAMPLE_DIR = SHARED / "data" / "tinystories-sample"

NOTEBOOKS = ["tokenization", "model", "training", "evaluation"]


@pytest.fixture(scope="session")
def notebook_work(tmp_path_factory):
    """NOTEBOOK_WORK of the notebooks of this test session (of this worker, under pytest -n)."""
    return tmp_path_factory.mktemp("notebooks")


# Where each notebook's kernel starts: Jupyter's default (the notebook's folder), the repository root (VS Code's
# workspace, papermill run from there), a folder inside the repository, and a folder outside it with the notebook's
# path in JPY_SESSION_NAME (as Jupyter server 2 sets it).
WHERE = {"tokenization": "repository", "model": "notebooks", "training": "config", "evaluation": "outside"}


def run_notebook(path, cwd):
    """Execute the notebook at `path` from a clean state in a kernel started in `cwd`. Returns the executed notebook;
    raises nbclient's CellExecutionError at the first cell that fails."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # from a clean state: nothing of the committed run is kept
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.fixture
def quick_notebooks(notebook_work, monkeypatch, hf_home):
    """The environment of a notebook run in the tests: quick mode, a private NOTEBOOK_WORK and HF_HOME, plots without
    a display, and no notebook path from an outer Jupyter."""
    if not os.environ.get("CI"):
        pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("NOTEBOOK_WORK", str(notebook_work))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, quick_notebooks, monkeypatch, tmp_path):
    if not HAVE_SHARED_SAMPLE and not os.environ.get("CI"):  # the notebooks read ../shared, not the tests' corpus
        pytest.skip(f"needs the TinyStories sample at {SAMPLE_DIR} (the notebooks would prepare or download data)")
    from nbclient.exceptions import CellExecutionError

    path = ROOT / "notebooks" / f"{name}.ipynb"
    cwd = {"repository": ROOT, "notebooks": path.parent, "config": ROOT / "config", "outside": tmp_path}[WHERE[name]]
    if WHERE[name] == "outside":
        monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    try:
        nb = run_notebook(path, cwd)
    except CellExecutionError as e:
        pytest.fail(f"{path.name}, its kernel started in {cwd}: a cell failed:\n{e}")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no picture"


@pytest.mark.slow
def test_notebook_says_where_to_start_when_nbutil_is_not_found(quick_notebooks, tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="notebooks/nbutil.py is not above .*start the kernel in the "
                                                 "repository"):
        run_notebook(ROOT / "notebooks" / "tokenization.ipynb", tmp_path)  # outside, and no notebook path given


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """nbutil with nothing of GPT-2's at hand: no ../shared ranks file, an empty data/ (DATA_ROOT), and tiktoken's
    download failing as it does offline. Returns the empty data/ folder."""
    real = nbutil.load_tokenizer

    def no_download(name):
        if name == "gpt2":
            raise UserError("could not load tiktoken's gpt2 encoding, which is downloaded on first use "
                            "(ConnectionError); offline, pass --tokenizer=path/to/gpt2.tiktoken")
        return real(name)

    monkeypatch.setattr(nbutil, "load_tokenizer", no_download)
    monkeypatch.setattr(nbutil, "GPT2_RANKS", str(tmp_path / "shared" / "tokenizers" / "gpt2.tiktoken"))
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(nbutil, "DATA_ROOT", str(data))
    return data


def test_gpt2_tokenizer_offline_with_nothing_names_the_notebook_variable(offline):
    with pytest.raises(UserError) as e:
        nbutil.gpt2_tokenizer()
    assert "GPT2_VOCAB" in str(e.value) and "first cell" in str(e.value) and "--tokenizer" not in str(e.value)
    with pytest.raises(UserError, match="GPT2_VOCAB='nowhere.tiktoken' does not exist"):
        nbutil.gpt2_tokenizer("nowhere.tiktoken")


@pytest.mark.slow  # starts prepare.py
def test_gpt2_tokenizer_offline_uses_the_vocabulary_prepare_wrote(offline, monkeypatch, hf_home, tiny_data):
    # the vocabulary in use (GPT-2's, or conftest's stand-in when it is not at hand) stands for GPT-2's here:
    # test_gpt2_fingerprint checks the real one
    vocab = load_tokenizer(str(GPT2_RANKS))
    monkeypatch.setattr(nbutil, "GPT2_SHA256", vocab.spec["sha256"])
    text = offline.parent / "text"
    text.mkdir()
    (text / "train.txt").write_text("Tom had a red ball.\n\nThe cat sat in the sun.\n", encoding="utf-8")
    (text / "validation.txt").write_text("A dog ran.\n", encoding="utf-8")
    shutil.copytree(tiny_data, offline / "mine")  # prepared with a BPE vocabulary: not GPT-2's, passed over
    run_script("prepare.py", f"--dataset={text}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={offline / 'sample'}",
               "--num_proc=1", env={"HF_HOME": str(hf_home)})
    tok = nbutil.gpt2_tokenizer()
    assert tok.spec["sha256"] == vocab.spec["sha256"] and tok.encode("Tom had a red ball.") == \
        vocab.encode("Tom had a red ball.")
    assert nbutil.gpt2_tokenizer(str(offline / "sample")).spec["sha256"] == vocab.spec["sha256"]  # GPT2_VOCAB
    with pytest.raises(UserError, match="not a directory prepared with GPT-2's vocabulary"):
        nbutil.gpt2_tokenizer(str(offline / "mine"))


@needs_gpt2
def test_gpt2_fingerprint():
    assert load_tokenizer(str(GPT2_RANKS)).spec["sha256"] == nbutil.GPT2_SHA256
