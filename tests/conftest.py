"""Shared fixtures: the text the tests read, a helper that runs a script as a user would, prepared sample data, and
the tiny models, data and runs that the tests of several subjects use.

Text: the TinyStories sample in ../shared (beside the repository) when it is there; otherwise a small corpus of
simple stories that this file writes from word lists, so that a fresh clone anywhere runs the suite. Likewise
GPT2_RANKS is GPT-2's vocabulary (../shared/tokenizers/gpt2.tiktoken, or tiktoken's cached download) when it can
be found offline, otherwise a small stand-in vocabulary in the same .tiktoken format learned from that corpus;
the few tests that need GPT-2's own ids are marked `needs_gpt2` and skip with a reason saying how to provide it.
Under CI=true a skipped test counts as a failure: CI provides everything, so every test must run there.

run_script starts most scripts in a process forked from one that has imported torch already (warm_python.py),
which saves the import in every run; TESTS_FRESH_PYTHON=1 starts a fresh interpreter for each instead.
"""
import atexit
import base64
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from warm_python import WarmPython

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # for the scripts the tests start
    import torch
    torch.set_num_threads(1)

# A model small enough to train for a few dozen steps in seconds.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--device=cpu",
        "--dtype=float32", "--eval_iters=5", "--log_interval=5", "--warmup_iters=5", "--learning_rate=3e-3",
        "--min_lr=3e-4"]

# --- text: the shared sample, or stories made here -------------------------------------------------------------
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Lucy", "Tim", "Zoe", "Jack"]
ANIMALS = ["cat", "dog", "bird", "bunny", "frog", "duck", "bear", "fox", "mouse", "fish"]
ADJECTIVES = ["little", "happy", "big", "kind", "small", "brave", "shy", "funny", "red", "soft"]
THINGS = ["ball", "kite", "box", "hat", "cake", "toy", "book", "boat", "flower", "stick"]
PLACES = ["park", "garden", "house", "forest", "pond", "school", "yard", "beach", "hill", "room"]
VERBS = ["play", "run", "jump", "sing", "dance", "swim", "read", "paint", "hide", "climb"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "excited", "surprised", "glad"]


def make_story(rng):
    """One short story in the style of TinyStories (a paragraph or two of simple sentences), from the word lists."""
    name, friend = rng.sample(NAMES, 2)
    animal, adjective, thing, place, verb = (rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(THINGS),
                                             rng.choice(PLACES), rng.choice(VERBS))
    feeling, later = rng.sample(FEELINGS, 2)
    first = [f"Once upon a time, there was a {adjective} {animal} named {name}.",
             f"{name} liked to {verb} in the {place} every day.",
             f"One day, {name} found a {thing} near the {place}.",
             f"{name} felt {feeling} and wanted to show it to {friend}."]
    second = [f'"Look, {friend}! I found a {thing}!" said {name}.',
              f"{friend} smiled and said, \"Let's {verb} with it together.\"",
              f"They played with the {thing} until the sun went down.",
              f"At the end of the day, {name} and {friend} were {later}. They were good friends."]
    if rng.random() < 0.5:
        first[1], first[2] = first[2], first[1]
    return " ".join(first) + ("\n\n" if rng.random() < 0.5 else " ") + " ".join(second[:rng.randint(2, 4)])


def write_corpus(folder, seed=1337, documents={"train": 4000, "validation": 2000}):
    """Write train.txt and validation.txt into `folder` in the shared sample's layout (one story per blank-line
    separated block; a story may span two blocks, as TinyStories' do). Deterministic for a seed. The sizes follow
    the shared sample's (4,662 and 2,150 blocks): tests that prepare validation.txt alone get the 0.5% prepare.py
    holds out of it, 10 stories, which must still fill one batch of TINY (8 x 32 tokens)."""
    rng = random.Random(seed)
    for split, n in documents.items():
        (folder / f"{split}.txt").write_text("\n\n".join(make_story(rng) for _ in range(n)) + "\n", encoding="utf-8")


def learn_ranks(text, merges=700):
    """A byte-level BPE vocabulary (Sennrich et al. 2016) in tiktoken's .tiktoken format: the 256 bytes, then up to
    `merges` tokens, each the most frequent adjacent pair of tokens over the words of `text` (split roughly as
    GPT-2's pattern splits them). Every token is two lower-ranked ones joined, which is what tiktoken's merging
    needs. Returns the file's text ("base64(token bytes) rank" per line)."""
    words = Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text))
    pieces = {tuple(bytes([b]) for b in word.encode()): n for word, n in words.items()}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter()
        for piece, n in pieces.items():
            for pair in zip(piece, piece[1:]):
                pairs[pair] += n
        new = next(((a, b) for (a, b), _ in pairs.most_common() if a + b not in ranks), None)
        if new is None:
            break
        ranks[new[0] + new[1]] = len(ranks)
        merged = {}
        for piece, n in pieces.items():
            out, i = [], 0
            while i < len(piece):
                if piece[i:i + 2] == new:
                    out.append(new[0] + new[1])
                    i += 2
                else:
                    out.append(piece[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        pieces = merged
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())


def find_gpt2_ranks():
    """GPT-2's ranks file when it is available offline: ../shared's, or the copy tiktoken cached on a download."""
    if (SHARED / "tokenizers" / "gpt2.tiktoken").is_file():
        return SHARED / "tokenizers" / "gpt2.tiktoken"
    import hashlib
    # tiktoken caches a download under the sha1 of its URL, in TIKTOKEN_CACHE_DIR or DATA_GYM_CACHE_DIR or
    # <tempdir>/data-gym-cache (tiktoken/load.py)
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if all(os.path.isfile(os.path.join(cache, hashlib.sha1((base + name).encode()).hexdigest()))
           for name in ("vocab.bpe", "encoder.json")):
        try:
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
            path = Path(MADE) / "gpt2.tiktoken"
            path.write_text("".join(f"{base64.b64encode(enc.decode_single_token_bytes(i)).decode()} {i}\n"
                                    for i in range(enc.eot_token)))
            return path
        except Exception:  # a damaged cache: as if there were none
            return None
    return None


MADE = tempfile.mkdtemp(prefix="tinystories-tests-")  # this process's made data, removed when it exits
atexit.register(shutil.rmtree, MADE, ignore_errors=True)
HAVE_SHARED_SAMPLE = (SHARED / "data" / "tinystories-sample" / "train.txt").is_file()
if HAVE_SHARED_SAMPLE:
    SAMPLE = SHARED / "data" / "tinystories-sample"
else:
    SAMPLE = Path(MADE) / "tinystories-sample"
    SAMPLE.mkdir()
    write_corpus(SAMPLE)
GPT2_RANKS = find_gpt2_ranks()
HAVE_GPT2 = GPT2_RANKS is not None
if not HAVE_GPT2:  # the stand-in: same file format and kind of tokenizer, ~1,000 ids instead of 50,257
    GPT2_RANKS = Path(MADE) / "standin.tiktoken"
    GPT2_RANKS.write_text(learn_ranks((SAMPLE / "train.txt").read_text(encoding="utf-8")[:200_000]))
FORMATS = SHARED / "data" / "tinystories-formats"

needs_gpt2 = pytest.mark.skipif(
    not HAVE_GPT2, reason="needs GPT-2's own vocabulary offline: put gpt2.tiktoken in ../shared/tokenizers/, or "
                          "run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once online")
needs_formats = pytest.mark.skipif(
    not FORMATS.is_dir(), reason="needs TinyStories' files in their published layouts in "
                                 "../shared/data/tinystories-formats/ (TinyStoriesV2-GPT4-*.txt, hub/, all_data/)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: CI installs everything, so a skip there means something is missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


SCRIPT_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # for every run_script
WARM = WarmPython({**os.environ, **SCRIPT_ENV})  # this environment: before any test changes os.environ
atexit.register(WARM.close)


def run_script(script, *args, cwd=ROOT, check=True, env=None, fresh=False, timeout=600):
    """Run `python script args...` from the repository root, offline; return the CompletedProcess. A run longer
    than `timeout` seconds fails the test (subprocess.TimeoutExpired) rather than hanging it.
    The process is forked from one that has imported torch already (warm_python.py) unless `env` changes what
    that one was started with, or `fresh`: then it is a fresh interpreter."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    if not fresh and WARM.can_run(full_env):
        proc = WARM.run(ROOT / script, args, cwd, full_env, timeout=timeout)
    else:
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments):
    """A user mistake ends with exit code 2 and one line on stderr (no traceback) that names the problem."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """A private Hugging Face cache, so tests neither use nor fill the user's."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, hf_home):
    """SAMPLE prepared with GPT2_RANKS (GPT-2's vocabulary, or the stand-in); returns the data directory."""
    data_dir = tmp_path_factory.mktemp("data") / "sample"
    run_script("prepare.py", f"--dataset={SAMPLE}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={data_dir}",
               "--num_proc=2", env={"HF_HOME": str(hf_home)})
    return data_dir


# --- shared by the tests of several subjects ---------------------------------------------------------------------
# model_args of a one-layer GPT with a 64-id vocabulary, for checkpoints built in the test process
TINY_ARGS = dict(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0, bias=True)
# TINY with a quick evaluation and a log row every iteration: the runs that tests stop, kill and resume
FAST = [*TINY, "--eval_iters=2", "--log_interval=1"]
# a few lines of stories: tiny_models' vocabulary and tiny_data's text
STORIES = ["Once upon a time there was a cat. The cat liked to play in the sun.",
           "Tom had a red ball. He threw it to his dog, and the dog ran after it."] * 20


def read_log(out_dir):
    """A run's log.csv as {iteration: row}."""
    import csv
    with open(out_dir / "log.csv") as f:
        return {int(row["iter"]): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def tiny_models():
    """serve.py's model list with one untrained 2-layer GPT and a 300-id vocabulary trained on a few lines."""
    import threading

    import torch
    from model import GPT, GPTConfig
    from prepare import train_bpe
    tok = train_bpe(STORIES, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    return [{"name": "tiny", "model": model, "tok": tok, "device": "cpu", "lock": threading.Lock(), "about": "x"}]


def tiny_checkpoint(tok, **changes):
    """The checkpoint dict of an untrained model of tiny_models' shape over `tok`, with `changes` applied."""
    import torch
    from model import GPT, GPTConfig
    args = {"vocab_size": 320, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    torch.manual_seed(0)
    ckpt = {"model": GPT(GPTConfig(**args)).state_dict(), "model_args": dict(args), "tokenizer": tok.spec,
            "config": {}, "iter_num": 0}
    ckpt.update(changes)
    return ckpt


def save_random_model(out_dir, tok, seed=0, **args):
    """Save a GPT of GPTConfig fields `args` over `tok` (vocab_size: tok's, padded to 64) as out_dir/
    best_model_params.pt, the way train.py saves it, with every parameter (norm gains and biases too) moved away
    from its init, so that an export that misplaces, transposes or permutes a tensor changes the logits.
    Returns the model (eval mode)."""
    import math

    import torch
    from files import save_torch
    from model import GPT, GPTConfig
    args = {"vocab_size": math.ceil(tok.vocab_size / 64) * 64, "n_layer": 2, "n_head": 2, "dropout": 0.0, **args}
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch({"model": model.state_dict(), "model_args": args, "tokenizer": tok.spec, "config": {},
                "iter_num": 0}, out_dir / "best_model_params.pt")
    return model.eval()


def chromium():
    """(playwright.sync_api, the path of Debian's chromium) for a browser test, or a skip naming what to install
    (under CI=true a skip fails). Playwright's own browser download is not used."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs Playwright: pip install -r requirements-dev.txt")
    path = shutil.which("chromium")
    if not path:
        pytest.skip("needs a Chromium browser on PATH as `chromium`: apt-get install chromium (Debian, Ubuntu), "
                    "or link your Chromium there; Playwright's own download is not used")
    return sync_api, path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data directory prepared from STORIES with a 300-id BPE vocabulary."""
    root = tmp_path_factory.mktemp("tiny_data")
    (root / "train.txt").write_text("\n\n".join(STORIES * 5), encoding="utf-8")
    (root / "validation.txt").write_text("\n\n".join(STORIES), encoding="utf-8")
    run_script("prepare.py", f"--dataset={root}", "--tokenizer=bpe", "--vocab_size=300", f"--data_dir={root}/data",
               "--num_proc=1", env={"HF_HOME": str(root / "hf")})
    return root / "data"


@pytest.fixture(scope="session")
def two_steps(sample_data, tmp_path_factory):
    """A run of FAST for 2 iterations, evaluated and saved at 2: its out_dir, which tests copy before resuming it."""
    out = tmp_path_factory.mktemp("two_steps") / "o"
    run_script("train.py", *FAST, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=2",
               "--eval_interval=2")
    return out
