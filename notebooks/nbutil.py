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

import json
import os
import subprocess
import sys

NOTEBOOKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(NOTEBOOKS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from errors import UserError  # noqa: E402 (needs the repository on sys.path)
from tokenizer import load_tokenizer  # noqa: E402

QUICK = os.environ.get("NOTEBOOK_QUICK", "") not in ("", "0")
WORK = os.path.abspath(os.environ.get("NOTEBOOK_WORK") or os.path.join(REPO, "out-notebooks"))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
SAMPLE = os.path.join(SHARED, "data", "tinystories-sample")      # train.txt and validation.txt
GPT2_RANKS = os.path.join(SHARED, "tokenizers", "gpt2.tiktoken")  # GPT-2's vocabulary, for offline use
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


def gpt2_tokenizer():
    """GPT-2's tokenizer: from ../shared/tokenizers/gpt2.tiktoken when present (offline), else tiktoken's
    download. Returns tokenizer.Tokenizer; raises UserError when neither works."""
    return load_tokenizer(GPT2_RANKS if os.path.isfile(GPT2_RANKS) else "gpt2")


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
    from tokenizer import tokenizer_from_meta
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
