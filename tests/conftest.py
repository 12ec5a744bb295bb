"""Shared fixtures: paths to ../shared, a helper that runs a script as a user would, and prepared sample data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "tinystories-sample"
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # for the scripts the tests start
    import torch
    torch.set_num_threads(1)

# A model small enough to train for a few dozen steps in seconds.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--device=cpu",
        "--dtype=float32", "--eval_iters=5", "--log_interval=5", "--warmup_iters=5", "--learning_rate=3e-3",
        "--min_lr=3e-4"]


def run_script(script, *args, cwd=ROOT, check=True, env=None):
    """Run `python script args...` from the repository root, offline; return the CompletedProcess."""
    full_env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
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
    """The shared TinyStories sample prepared with the local GPT-2 ranks file; returns the data directory."""
    data_dir = tmp_path_factory.mktemp("data") / "sample"
    run_script("prepare.py", f"--dataset={SAMPLE}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={data_dir}",
               "--num_proc=2", env={"HF_HOME": str(hf_home)})
    return data_dir
