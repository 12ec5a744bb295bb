"""Fine-tuning on your own text: prepare.py --tokenizer=CHECKPOINT, then train.py --init_from=CHECKPOINT."""
import csv
import json

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, load_model
from files import save_torch
from conftest import GPT2_RANKS, SAMPLE, TINY, assert_user_error, run_script
from tokenizer import load_tokenizer

# the settings of a fine-tuning run, without TINY's shape: n_layer, n_head, n_embd and block_size come from the base
FINE = ["--batch_size=8", "--device=cpu", "--dtype=float32", "--eval_iters=5", "--log_interval=1",
        "--warmup_iters=1", "--learning_rate=1e-3", "--min_lr=1e-4", "--lr_decay_iters=10"]


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_checkpoint_path_loads_the_checkpoints_tokenizer(tmp_path):
    tok = load_tokenizer(str(GPT2_RANKS))
    save_torch({"model": {}, "model_args": {}, "tokenizer": tok.spec, "config": {}}, tmp_path / "c.pt")
    loaded = load_tokenizer(str(tmp_path / "c.pt"))
    assert loaded.spec["sha256"] == tok.spec["sha256"]
    text = "Once upon a time, a fox met a crow."
    assert loaded.encode(text) == tok.encode(text) and loaded.decode(loaded.encode(text)) == text


@pytest.fixture(scope="module")
def base(sample_data, tmp_path_factory):
    """A tiny model trained 4 steps on the sample: its out_dir."""
    out = tmp_path_factory.mktemp("base") / "out"
    run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=4",
               "--eval_interval=4", "--lr_decay_iters=10")
    return out


@pytest.fixture(scope="module")
def my_text(base, tmp_path_factory, hf_home):
    """Other text (the sample's validation file standing in for your own stories), prepared with the base's
    tokenizer: its data directory."""
    data = tmp_path_factory.mktemp("mine") / "data"
    run_script("prepare.py", f"--dataset={SAMPLE / 'validation.txt'}", f"--tokenizer={base}/best_model_params.pt",
               f"--data_dir={data}", "--val_fraction=0.2", "--num_proc=1", env={"HF_HOME": str(hf_home)})
    return data


@pytest.mark.slow
def test_fine_tuning_starts_a_new_run_from_the_checkpoints_weights(base, my_text, tmp_path):
    ckpt_path = base / "best_model_params.pt"
    base_ckpt = load_checkpoint(ckpt_path)
    meta = json.loads((my_text / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == base_ckpt["tokenizer"]["sha256"]

    out = tmp_path / "ft"
    proc = run_script("train.py", *FINE, f"--data_dir={my_text}", f"--out_dir={out}", f"--init_from={ckpt_path}",
                      "--max_iters=2", "--eval_interval=2")
    assert ("the model shape is the checkpoint's: block_size=32 (not 256), n_layer=2 (not 6), n_head=2 (not 6), "
            "n_embd=32 (not 384)") in proc.stdout
    assert "with a fresh optimizer" in proc.stdout
    rows = read_log(out / "log.csv")
    assert [int(r["iter"]) for r in rows] == [0, 2]  # a new run: from iteration 0, its own log

    # its first evaluation is the base model's loss on the new text, over the same batches train.py draws
    import plumbing
    import train
    model, _, _ = load_model(str(ckpt_path))
    gen = torch.Generator()
    losses = []
    with torch.no_grad():
        for k in range(5):
            gen.manual_seed(plumbing.batch_seed(1337, "validation", "eval", 0, k))
            x, y = train.get_batch(str(my_text / "validation.bin"), meta["dtype"], 8, 32, "cpu", gen)
            losses.append(model(x, y)[1].item())
    assert float(rows[0]["val_loss"]) == pytest.approx(np.mean(losses), abs=2e-5)

    ft = load_checkpoint(out / "ckpt.pt")
    assert ft["iter_num"] == 2 and ft["model_args"] == base_ckpt["model_args"]
    assert len(ft["optimizer"]["state"]) > 0
    assert not torch.equal(ft["model"]["lm_head.weight"], base_ckpt["model"]["lm_head.weight"])  # it trained

    # resuming the fine-tuned run with the same flags keeps the checkpoint's shape
    proc = run_script("train.py", *FINE, f"--data_dir={my_text}", f"--out_dir={out}", "--init_from=resume",
                      "--max_iters=3", "--eval_interval=2")
    assert "resuming from iteration 2" in proc.stdout
    assert [int(r["iter"]) for r in read_log(out / "log.csv")] == [0, 2, 3]


@pytest.mark.slow
def test_fine_tuning_refusals(base, my_text, tmp_path):
    ckpt = load_checkpoint(base / "best_model_params.pt")
    save_torch({**ckpt, "tokenizer": {**ckpt["tokenizer"], "name": "other", "sha256": "0" * 64}},
                    tmp_path / "other.pt")
    before = sorted(tmp_path.rglob("*"))
    cases = [
        ([f"--init_from={tmp_path}/other.pt"], ["cannot fine-tune", "another tokenizer (other (fingerprint ",
                                                f"prepare.py --tokenizer={tmp_path}/other.pt"]),
        ([f"--init_from={tmp_path}/nope.pt"], ["nope.pt' is not 'scratch', 'resume' or a checkpoint file"]),
        ([f"--init_from={base}"], [f"e.g. {base}/best_model_params.pt"]),
    ]
    for args, fragments in cases:
        proc = run_script("train.py", *FINE, f"--data_dir={my_text}", f"--out_dir={tmp_path}/ft", *args,
                          check=False)
        assert_user_error(proc, *fragments)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written

    run_log = (base / "log.csv").read_text()
    proc = run_script("train.py", *FINE, f"--data_dir={my_text}", f"--out_dir={base}",
                      f"--init_from={base}/best_model_params.pt", check=False)
    assert_user_error(proc, "already holds a run", "another --out_dir")
    assert (base / "log.csv").read_text() == run_log

    proc = run_script("prepare.py", f"--dataset={SAMPLE}", f"--tokenizer={tmp_path}/nope.pt",
                      f"--data_dir={tmp_path}/d", check=False)
    assert_user_error(proc, "tokenizer", "nope.pt' not found", "a checkpoint (.pt)")
