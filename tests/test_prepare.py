"""prepare.py as a user meets it: offline, its summary, a too-small split, killed while writing, a full disk, a copy of
the whole hub repository, text files with a bad line."""
import os
import re
import subprocess
import sys
import time

import pytest

import prepare
from configurator import UserError
from conftest import GPT2_RANKS, ROOT, SAMPLE, TINY, assert_user_error, run_script
from test_configs import TRAIN_CONFIGS, assignments


@pytest.mark.slow  # prepare.py as a subprocess
def test_offline_hub_download_fails_at_once_naming_the_ways_out(tmp_path, hf_home):
    # the hub made unreachable (a closed local port) and the offline switches off: a user's machine without network
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "",
           "HF_DATASETS_OFFLINE": "", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
    proc = run_script("prepare.py", f"--tokenizer={GPT2_RANKS}", f"--data_dir={tmp_path}/d", check=False, env=env)
    assert_user_error(proc, "cannot reach 127.0.0.1 to download roneneldan/TinyStories", "--dataset=PATH",
                      "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # prepare.py as a subprocess
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


@pytest.mark.slow
def test_smallest_batch_is_the_smallest_configs():
    batches = [assignments(path).get("batch_size", 32) * assignments(path).get("block_size", 256)
               for path in TRAIN_CONFIGS]
    assert prepare._SMALLEST_BATCH == min(batches)


@pytest.mark.slow
def test_prepare_killed_while_writing_leaves_nothing_that_looks_complete(tmp_path, hf_home):
    data = tmp_path / "d"
    cmd = [sys.executable, str(ROOT / "prepare.py"), f"--dataset={SAMPLE}", "--tokenizer=bpe", "--vocab_size=300",
           f"--data_dir={data}", "--num_proc=1", "--shards=100000"]  # many small shards: a longer write
    env = {**os.environ, "HF_HOME": str(hf_home)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # a complete, older preparation
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"}
    proc = subprocess.Popen([*cmd, "--force", "--vocab_size=400"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(data.glob(".*.bin.*.tmp")):
        time.sleep(0.0002)
    proc.kill()
    proc.wait()
    assert list(data.glob(".*.bin.*.tmp")), "the kill did not land during a write"
    # the new files were written aside: the older preparation is still there, complete and usable
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.suffix != ".tmp" and p.name != ".lock"} == before
    proc = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/o", "--max_iters=1",
                      "--eval_iters=1")
    assert "done: best validation loss" in proc.stdout


@pytest.mark.slow
def test_prepare_on_a_full_disk_keeps_the_previous_data(sample_data, tmp_path, hf_home):
    import resource
    import shutil
    import signal
    data = tmp_path / "d"
    shutil.copytree(sample_data, data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"}
    limit = os.path.getsize(data / "validation.bin") + 10_000  # train.bin cannot be written whole

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    from conftest import GPT2_RANKS
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--dataset={SAMPLE}",
                           f"--tokenizer={GPT2_RANKS}", f"--data_dir={data}", "--num_proc=1", "--force"],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk,
                          env={**os.environ, "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1"})
    assert_user_error(proc, f"could not write the prepared data in {data}", "previous data there is unchanged")
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"} == before  # and no temporary file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """In-process `datasets` calls cache into a private folder."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.mark.parametrize("files,message", [
    ({"train.txt": "<|endoftext|>\n<|endoftext|>\n\n<|endoftext|>\n"},
     "train.txt (the train split) holds no documents, only <|endoftext|> lines and whitespace"),
    ({"train.jsonl": '{"text": "A story."}\n{"text": "Another."}\n{"text": "cut off\n{"text": "Last."}\n'},
     "train.jsonl line 3: not valid JSON"),
    ({"train.jsonl": '{"text": "A story."}\n["a list"]\n'}, "train.jsonl line 2: a JSON list, not an object"),
    ({"train.json": '[{"text": "A story."},\n {"text": "Another."\n]\n'}, "train.json line 3: not valid JSON"),
])
def test_odd_text_files_are_one_line_naming_file_and_line(tmp_path, cache, files, message):
    from prepare import load_splits
    for name, text in files.items():
        (tmp_path / "stories").mkdir(exist_ok=True)
        (tmp_path / "stories" / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)):
        load_splits(str(tmp_path / "stories"), "text")


def test_a_copy_of_the_whole_hub_repository_reads_its_data_shards(tmp_path, capsys):
    """The files `hf download roneneldan/TinyStories --repo-type=dataset --local-dir=ts` puts in one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prepare import local_files
    ts = tmp_path / "ts"
    (ts / "data").mkdir(parents=True)
    for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", "TinyStories-train.txt",
                 "TinyStories-valid.txt"):
        (ts / name).write_text("A story.\n<|endoftext|>\nAnother.\n", encoding="utf-8")
    (ts / "TinyStories_all_data.tar.gz").write_bytes(b"\x1f\x8b")
    (ts / "README.md").write_text("# TinyStories\n")
    (ts / "Evaluation prompts.yaml").write_text("- Once upon a time\n")
    (ts / ".cache" / "huggingface" / "download").mkdir(parents=True)  # hf download's own bookkeeping
    (ts / ".cache" / "huggingface" / "download" / "TinyStories-train.txt.metadata").write_text("x")
    for split, n in (("train", 4), ("validation", 1)):
        for i in range(n):
            pq.write_table(pa.table({"text": [f"Story {i}."]}), ts / "data" / f"{split}-{i:05d}-of-{n:05d}-abc.parquet")
    files, builder = local_files(str(ts))
    assert builder == "parquet" and len(files["train"]) == 4 and len(files["validation"]) == 1
    out = capsys.readouterr().out
    assert "the hub's data/ shards" in out
    for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", "TinyStories-train.txt",
                 "TinyStories-valid.txt", "TinyStories_all_data.tar.gz"):
        assert name in out.split("not read:")[1], out


def test_training_a_bpe_vocabulary_prints_nothing(capfd):
    """The tokenizers library's progress display printed a blank line per stage when its output was not a terminal;
    prepare.py says what it trains in one line of its own instead."""
    tok = prepare.train_bpe(["Once upon a time there was a cat.", "The cat sat on a mat."] * 50, 300)
    assert tok.vocab_size > 256
    assert capfd.readouterr() == ("", "")
