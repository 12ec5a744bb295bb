"""What a new user meets first: prepare.py offline, its summary, a too-small split; the learning-rate schedule
following --max_iters; log.csv's clock across a resume; export.py without its optional package."""
import csv

import pytest

import prepare
from conftest import GPT2_RANKS, SAMPLE, TINY, assert_user_error, run_script
from test_configs import CONFIGS, assignments

pytestmark = pytest.mark.slow  # prepare.py and train.py as subprocesses


def test_offline_hub_download_fails_at_once_naming_the_ways_out(tmp_path, hf_home):
    # the hub made unreachable (a closed local port) and the offline switches off: a user's machine without network
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "",
           "HF_DATASETS_OFFLINE": "", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
    proc = run_script("prepare.py", f"--tokenizer={GPT2_RANKS}", f"--data_dir={tmp_path}/d", check=False, env=env)
    assert_user_error(proc, "cannot reach 127.0.0.1 to download roneneldan/TinyStories", "--dataset=PATH",
                      "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    assert not (tmp_path / "d").exists()


def test_summary_is_the_settings_that_apply_and_a_small_split_is_named(tmp_path, hf_home):
    story = (SAMPLE / "validation.txt").read_text(encoding="utf-8").split("\n\n")[0]
    folder = tmp_path / "stories"
    folder.mkdir()
    (folder / "train.txt").write_text((story + "\n\n") * 200, encoding="utf-8")
    (folder / "validation.txt").write_text(story + "\n", encoding="utf-8")  # one story: under one batch
    proc = run_script("prepare.py", f"--dataset={folder}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={tmp_path}/d",
                      "--num_proc=1", env={"HF_HOME": str(hf_home)})
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("prepare.py --dataset=") and "vocab_size" not in lines[0]  # only --tokenizer=bpe's
    assert "_CHUNK" not in proc.stdout and "" not in lines  # no internals, no blank lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "the validation split has" in notes[0] and "--batch_size" in notes[0]


def test_smallest_batch_is_the_smallest_configs():
    batches = [assignments(path).get("batch_size", 32) * assignments(path).get("block_size", 256) for path in CONFIGS]
    assert prepare._SMALLEST_BATCH == min(batches)


def read_log(out_dir):
    with open(out_dir / "log.csv") as f:
        return {int(row["iter"]): row for row in csv.DictReader(f)}


def test_max_iters_alone_ends_the_decay_with_the_run(sample_data, tmp_path):
    # the config as a user runs it, shrunk only in the model and the evaluation so that 100 iterations are quick
    small = ["--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=1",
             "--eval_interval=50", "--device=cpu", "--dtype=float32"]
    proc = run_script("train.py", "config/tinystories_cpu.py", *small, f"--data_dir={sample_data}",
                      f"--out_dir={tmp_path}/o", "--max_iters=100")
    assert "learning rate: up to 0.002 over 50 iterations, then cosine down to 0.0002 at iteration 100" in proc.stdout
    lr = {it: float(row["lr"]) for it, row in read_log(tmp_path / "o").items()}
    assert lr[100] == 2e-4 and 2e-4 < lr[50] <= 2e-3  # min_lr at the end of this run, not at the config's 500
    # a warmup longer than the run is cut to a tenth of it
    proc = run_script("train.py", "config/tinystories_cpu.py", *small, f"--data_dir={sample_data}",
                      f"--out_dir={tmp_path}/p", "--max_iters=40")
    assert "warming up over the first 4 instead" in proc.stdout
    lr = {it: float(row["lr"]) for it, row in read_log(tmp_path / "p").items()}
    assert lr[40] == 2e-4


def test_elapsed_time_continues_across_a_resume(sample_data, tmp_path):
    args = [*TINY, f"--data_dir={sample_data}", f"--out_dir={tmp_path}/o", "--eval_interval=10", "--eval_iters=1",
            "--lr_decay_iters=40"]
    run_script("train.py", *args, "--max_iters=20")
    run_script("train.py", *args, "--max_iters=40", "--init_from=resume")
    rows = read_log(tmp_path / "o")
    elapsed = [float(rows[it]["elapsed_s"]) for it in (0, 10, 20, 30, 40)]
    assert elapsed == sorted(elapsed)  # the clock of the run, not of each process: it never goes back


def test_export_without_safetensors_names_the_pip_install(tmp_path):
    # a safetensors package that cannot be imported, found before the installed one: a machine without it
    blocked = tmp_path / "blocked" / "safetensors"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run_script("export.py", f"--out_dir={tmp_path}", f"--export_dir={tmp_path}/hf", check=False,
                      env={"PYTHONPATH": str(blocked.parent)})
    assert_user_error(proc, "export.py needs safetensors: pip install safetensors")
    assert not (tmp_path / "hf").exists()
