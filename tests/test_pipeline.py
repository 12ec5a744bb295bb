"""prepare.py -> train.py -> sample.py as a user runs them, offline on the shared TinyStories sample."""
import csv
import json
import math

import numpy as np
import pytest

from tokenizer import load_tokenizer
from conftest import GPT2_RANKS, HAVE_GPT2, SAMPLE, TINY, assert_user_error, run_script


def blocks(path):
    """The documents of a .txt file: blocks separated by a blank line."""
    return [b for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]


@pytest.mark.slow
def test_meta_json_counts_match_the_bin_files_and_the_text(sample_data):
    meta = json.loads((sample_data / "meta.json").read_text())
    tok = load_tokenizer(str(GPT2_RANKS))
    assert meta["vocab_size"] == tok.vocab_size and meta["eot_token"] == tok.eot_token and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["sha256"] == tok.spec["sha256"]
    for split in ("train", "validation"):
        docs = blocks(SAMPLE / f"{split}.txt")
        counts = meta["splits"][split]
        tokens = np.fromfile(sample_data / f"{split}.bin", dtype=np.uint16)
        assert counts["tokens"] == tokens.size
        assert counts["documents"] == len(docs) == int((tokens == tok.eot_token).sum())
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        assert counts["tokens"] == sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    first = tok.encode(blocks(SAMPLE / "train.txt")[0]) + [tok.eot_token]
    assert np.fromfile(sample_data / "train.bin", dtype=np.uint16)[:len(first)].tolist() == first


@pytest.mark.slow
def test_rerun_is_a_no_op_and_force_rebuilds(sample_data, hf_home):
    args = [f"--dataset={SAMPLE}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={sample_data}"]
    before = (sample_data / "train.bin").stat().st_mtime_ns
    proc = run_script("prepare.py", *args, env={"HF_HOME": str(hf_home)})
    assert "up to date" in proc.stdout and (sample_data / "train.bin").stat().st_mtime_ns == before
    proc = run_script("prepare.py", *args, "--force", "--num_proc=1", env={"HF_HOME": str(hf_home)})
    assert f"train: {len(blocks(SAMPLE / 'train.txt')):,} documents" in proc.stdout
    assert (sample_data / "train.bin").stat().st_mtime_ns != before


@pytest.mark.slow
def test_train_resume_and_sample_end_to_end(sample_data, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=60",
               "--eval_interval=30", "--lr_decay_iters=60")
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows] == [0, 30, 60]
    val = [float(r["val_loss"]) for r in rows]
    vocab_size = json.loads((sample_data / "meta.json").read_text())["vocab_size"]
    # an untrained model guesses about uniformly: ln(vocab_size) nats (10.8 for GPT-2's 50,257 ids); small random
    # logits of spread s raise that by about s^2 / 2 on average, so the first evaluation cannot be 1 nat below it
    assert val[0] > math.log(vocab_size) - 1 and val[2] < val[0] - 2.0  # it learned
    for name in ("best_model_params.pt", "ckpt.pt", "loss.png"):
        assert (out / name).stat().st_size > 0

    # (a fresh start in this out_dir is refused: test_cli_errors.py's run_exists row, test_resume.py after a run)
    proc = run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=70",
                      "--eval_interval=30", "--lr_decay_iters=60", "--init_from=resume")
    assert "resuming from iteration 60" in proc.stdout and "iter 70:" in proc.stdout
    with open(out / "log.csv") as f:
        assert [int(r["iter"]) for r in csv.DictReader(f)] == [0, 30, 60, 70]  # iteration 60 logged once

    # from another folder: the checkpoint carries its tokenizer, so sampling needs neither the data directory nor
    # the ranks file (that a seed gives the same stories: test_stream.py, against the model's own generate)
    proc = run_script("sample.py", f"--out_dir={out}", "--start=Once upon a time", "--num_samples=2",
                      "--max_new_tokens=30", "--device=cpu", cwd=tmp_path)
    samples = [s.strip() for s in proc.stdout.split("-" * 80) if s.strip()]
    assert len(samples) == 2
    assert all(s.startswith("Once upon a time") for s in samples)
    assert any(len(s) > len("Once upon a time") for s in samples)  # a story may also end at once
    if HAVE_GPT2:  # decodable text: GPT-2's 50,257 ids leave the lone bytes 0x80-0xff a small share, where the
        # tests' own stand-in vocabulary gives them a quarter of its ids, and 60 steps do not teach the model that
        assert "\ufffd" not in proc.stdout


@pytest.mark.slow
def test_data_directory_carries_its_tokenizer(tmp_path, hf_home):
    ranks = tmp_path / "gpt2.tiktoken"
    ranks.write_bytes(GPT2_RANKS.read_bytes())
    data = tmp_path / "d"
    run_script("prepare.py", f"--dataset={SAMPLE}/validation.txt", f"--tokenizer={ranks}", f"--data_dir={data}",
               env={"HF_HOME": str(hf_home)})
    ranks.unlink()  # the original ranks file is gone (or the data moved to another machine)
    assert (data / "tokenizer.tiktoken").read_bytes() == GPT2_RANKS.read_bytes()
    run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/o", "--max_iters=1",
               "--eval_iters=1")
    (data / "tokenizer.tiktoken").write_text("SGVsbG8= 0\n")
    assert_user_error(run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/o2",
                                 check=False), "has changed since", "--force")


@pytest.mark.slow
def test_prepare_validates_settings_and_reads_another_text_column(tmp_path, hf_home):
    env = {"HF_HOME": str(hf_home)}
    for flags, message in ((["--shards=0"], "shards must be at least 1"),
                           (["--val_fraction=1.0"], "val_fraction must be between 0 and 1"),
                           (["--tokenizer=bpe", "--vocab_size=100"], "use 256 to 1,000,000")):
        proc = run_script("prepare.py", f"--dataset={SAMPLE}", *flags, f"--data_dir={tmp_path}/v", check=False,
                          env=env)
        assert_user_error(proc, message)
    jsonl = tmp_path / "stories"
    jsonl.mkdir()
    (jsonl / "train.jsonl").write_text("".join(json.dumps({"story": f"Story number {i}."}) + "\n"
                                               for i in range(50)))
    run_script("prepare.py", f"--dataset={jsonl}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={tmp_path}/j",
               "--text_column=story", "--val_fraction=0.1", env=env)
    meta = json.loads((tmp_path / "j" / "meta.json").read_text())
    assert meta["splits"]["validation"]["documents"] == 5 and meta["splits"]["train"]["documents"] == 45


def test_a_token_id_that_does_not_fit_the_dtype_leaves_no_file(tmp_path):
    import datasets
    from configurator import UserError
    from files import atomic_file
    from prepare import write_split
    ds = datasets.Dataset.from_dict({"ids": [[1, 2], [300, 3]], "len": [2, 2]})
    with pytest.raises(UserError, match="token id 300 does not fit uint8"):
        with atomic_file(tmp_path / "train.bin", "wb") as f:
            write_split(ds, f, np.uint8, 2)
    assert list(tmp_path.iterdir()) == []
