"""What the four notebooks share: where the repository, the data and the small models are, and the short mode
the tests run them in. Everything else they import from the project's own modules (model.py, tokenizer.py,
train.py, eval.py, checkpoint.py); nothing here is a second copy of the model or of training.

Importing this module puts the repository root on sys.path, so `import model` works from notebooks/.

Environment variables (the notebooks work without any):
    NOTEBOOK_QUICK=1    shrink every run (iterations, text, samples) so a notebook finishes in seconds; the test
                        suite (tests/test_notebooks.py) sets it. The numbers it gives mean little.
    NOTEBOOK_WORK=DIR   where the notebooks write prepared data and the models they train
                        (default: out-notebooks/ in the repository, which git ignores).
"""

import glob
import json
import os
import subprocess
import sys

NOTEBOOKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(NOTEBOOKS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from errors import UserError  # noqa: E402 (needs the repository on sys.path)
from tokenizer import load_tokenizer, tokenizer_from_meta  # noqa: E402

QUICK = os.environ.get("NOTEBOOK_QUICK", "") not in ("", "0")
WORK = os.path.abspath(os.environ.get("NOTEBOOK_WORK") or os.path.join(REPO, "out-notebooks"))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
SAMPLE = os.path.join(SHARED, "data", "tinystories-sample")      # train.txt and validation.txt
GPT2_RANKS = os.path.join(SHARED, "tokenizers", "gpt2.tiktoken")  # GPT-2's vocabulary, for offline use
# The fingerprint of GPT-2's vocabulary (tokenizer.py's spec "sha256", which meta.json keeps): how gpt2_tokenizer
# recognizes data that prepare.py wrote with it, whatever the path it was given as.
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
DATA_ROOT = os.path.join(REPO, "data")  # where README's commands have prepare.py write its data directories
# Data prepare.py may already have written (README's commands), smallest vocabulary first: a 4,096-id model
# trains several times faster on a CPU than one with GPT-2's 50,257 ids.
PREPARED = ["data/tinystories-bpe4096", "data/sample-bpe4096", "data/tinystories", "data/sample"]
# The small model the notebooks train when they are given none: config/tinystories_1m_bpe.py's shape
# (4 layers, 4 heads, 128 wide, 128 tokens of context; 1.3M parameters with a 4,096-id vocabulary).
SMALL_CONFIG = "config/tinystories_1m_bpe.py"


def quick(full, short):
    """`short` in the quick mode of the tests (NOTEBOOK_QUICK=1), else `full`."""
    return short if QUICK else full


def is_prepared(path):
    """True if `path` is a directory that prepare.py wrote (it holds meta.json and both .bin files)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("meta.json", "train.bin", "validation.bin"))


def find_text(path=""):
    """A directory or file of stories in plain text: `path` if given, else the TinyStories sample in ../shared.
    Raises UserError saying how to get some when there is none."""
    for candidate in ([path] if path else [SAMPLE]):
        if os.path.exists(candidate):
            return candidate
    raise UserError(f"no stories found{f' at {path}' if path else ''}: set DATA in the first cell to a folder of "
                    f"TinyStories text (train.txt, validation.txt) or to data prepared by prepare.py, or run "
                    f"`python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096` "
                    f"in the repository (downloads TinyStories)")


def find_data(path=""):
    """A directory of prepared data (prepare.py's train.bin, validation.bin and meta.json), found in this order:
    `path` if it is one; else, unless `path` names text, what prepare.py already wrote under data/ (PREPARED; in
    quick mode the ../shared sample comes first, so tests do not depend on what a developer has prepared);
    else the text at `path` or the ../shared sample, prepared here with a 4,096-id BPE into NOTEBOOK_WORK
    (once: prepare.py does nothing when its inputs are unchanged). Returns the directory's path, relative to
    the current directory when it is inside the repository (shorter to print)."""
    if path and is_prepared(path):
        return shown(path)
    if not path and not (QUICK and os.path.exists(SAMPLE)):
        for candidate in PREPARED:
            if is_prepared(os.path.join(REPO, candidate)):
                return shown(os.path.join(REPO, candidate))
    text = os.path.abspath(find_text(path))
    data_dir = os.path.join(WORK, "data-bpe4096" if text == os.path.abspath(SAMPLE) else
                            "data-" + os.path.basename(text.rstrip("/")) + "-bpe4096")
    run_script("prepare.py", f"--dataset={text}", "--tokenizer=bpe", "--vocab_size=4096", f"--data_dir={data_dir}")
    return shown(data_dir)


def shown(path):
    """`path` relative to the current directory if it lies in the repository, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path) if path.startswith(REPO + os.sep) else path


def read_meta(data_dir):
    """meta.json of prepared data, a dict (see prepare.py)."""
    with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def is_gpt2_data(path):
    """True if `path` is a directory with a meta.json of prepare.py's whose tokenizer is GPT-2's (GPT2_SHA256)."""
    try:
        return read_meta(path)["tokenizer"]["sha256"] == GPT2_SHA256
    except (OSError, ValueError, KeyError, TypeError):  # no meta.json, or not prepare.py's
        return False


def gpt2_tokenizer(path=""):
    """GPT-2's tokenizer, found offline where it can be: `path` if given (a .tiktoken ranks file, or a directory
    that prepare.py wrote with GPT-2's vocabulary); else ../shared/tokenizers/gpt2.tiktoken; else the vocabulary
    prepare.py copied into a data directory it prepared with GPT-2's (data/tinystories/ and data/sample/ from
    README's commands: any DATA_ROOT/*/meta.json whose tokenizer has GPT2_SHA256, loaded with
    tokenizer.tokenizer_from_meta); else tiktoken's download (cached after the first).

    Args:
        path: str, "" to search (the tokenization notebook's GPT2_VOCAB).
    Returns:
        tokenizer.Tokenizer.
    Raises:
        UserError: `path` is missing or neither a ranks file nor data prepared with GPT-2's vocabulary, or nothing
        was found and the download failed (offline): the message says to set GPT2_VOCAB in the notebook's first
        cell.
    """
    if path:
        if not os.path.exists(path):
            raise UserError(f"GPT2_VOCAB={path!r} does not exist (seen from {os.getcwd()}): set it to the path of "
                            f"gpt2.tiktoken or of data prepared with GPT-2's vocabulary, or to \"\" to search")
        if os.path.isdir(path):
            if not is_gpt2_data(path):
                raise UserError(f"GPT2_VOCAB={path!r} is not a directory prepared with GPT-2's vocabulary (no "
                                f"meta.json, or it names another tokenizer): set it to the path of gpt2.tiktoken "
                                f"or of data that `python prepare.py` wrote with GPT-2's vocabulary")
            return tokenizer_from_meta(read_meta(path), path)
        return load_tokenizer(path)
    if os.path.isfile(GPT2_RANKS):
        return load_tokenizer(GPT2_RANKS)
    for data_dir in sorted(glob.glob(os.path.join(DATA_ROOT, "*", ""))):
        if is_gpt2_data(data_dir):
            try:
                return tokenizer_from_meta(read_meta(data_dir), data_dir)
            except UserError:
                continue  # its tokenizer file is missing or changed: look further
    try:
        return load_tokenizer("gpt2")
    except UserError:
        raise UserError(f"GPT-2's vocabulary is not available offline (no {GPT2_RANKS}, no data prepared with it "
                        f"under {DATA_ROOT}, and tiktoken's download failed): set GPT2_VOCAB in the first cell to "
                        f"the path of gpt2.tiktoken or of data prepared with it (`python prepare.py`), or run the "
                        f"notebook once online") from None


def stories(path="", limit=None, split="train"):
    """Text of the stories in `split` (str, at most `limit` characters): the .txt file of that split when the
    text is at hand (find_text), else decoded from prepared data (find_data, with its own tokenizer)."""
    try:
        text = find_text(path)
    except UserError:
        text = None
    if text and os.path.isdir(text) and os.path.isfile(os.path.join(text, f"{split}.txt")):
        with open(os.path.join(text, f"{split}.txt"), encoding="utf-8") as f:
            return f.read(limit) if limit else f.read()
    if text and os.path.isfile(text) and text.endswith(".txt"):
        with open(text, encoding="utf-8") as f:
            return f.read(limit) if limit else f.read()
    import numpy as np
    data_dir = find_data(path)
    meta = read_meta(data_dir)
    ids = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    # about 4 bytes per token: decode enough tokens for `limit` characters, documents separated by blank lines
    ids = ids[:4 * limit] if limit else ids
    text = tokenizer_from_meta(meta, data_dir).decode(ids.tolist()).replace("<|endoftext|>", "\n\n")
    return text[:limit] if limit else text


def train_small(name, data_dir, max_iters, **settings):
    """Train config/tinystories_1m_bpe.py's model on `data_dir` with train.py for `max_iters` iterations into
    NOTEBOOK_WORK/name, unless that folder already holds a finished run, and return the path of its
    best_model_params.pt. `settings` are more train.py settings (name=value). Evaluates 5 times along the run
    (twice in quick mode: each evaluation also saves the checkpoints)."""
    out_dir = os.path.join(WORK, name)
    best = shown(os.path.join(out_dir, "best_model_params.pt"))
    if os.path.isfile(best):
        return best
    warmup = max(1, max_iters // 10)
    args = {"data_dir": os.path.abspath(data_dir), "out_dir": out_dir, "vocab_size": 0, "max_iters": max_iters,
            "lr_decay_iters": max_iters, "warmup_iters": warmup, "eval_interval": max(1, max_iters // quick(5, 2)),
            "eval_iters": quick(20, 2), "log_interval": max(1, max_iters // 5), **settings}
    run_script("train.py", SMALL_CONFIG, *(f"--{k}={v}" for k, v in args.items()))
    return best


def run_script(script, *args):
    """Run one of the project's scripts as a user would (`python script args` in the repository root; paths in
    args absolute) and print the last lines of its report. Raises RuntimeError with its output when it fails."""
    # the notebooks only prepare local text: Hugging Face datasets need not look online
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"python {script} {' '.join(args)} failed:\n" + "\n".join(lines[-20:]))
    def short(text):  # paths as seen from the repository root
        return text.replace(SHARED, os.path.join("..", "shared")).replace(REPO + os.sep, "")

    report = [short(line) for line in lines if "it/s]" not in line]  # without the progress bars
    print(f"python {script} {short(' '.join(args))}", *report[-2:], sep="\n  ")


def setup_plots():
    """matplotlib for notebooks committed with their outputs: PNG pictures at 80 dpi, so that a notebook stays
    small on GitHub."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (8, 4), "axes.grid": True,
                         "grid.alpha": 0.3})
