"""bench.py runs end to end at tiny sizes and reports every figure (its speed is measured, not tested)."""
import json

import pytest

from conftest import GPT2_RANKS, SAMPLE, assert_user_error, run_script

pytestmark = pytest.mark.slow  # every test here starts scripts as subprocesses


def test_bench_runs_at_tiny_sizes(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 32\nbatch_size = 4\nvocab_size = 512\n")
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", f"--model_config={cfg}", "--device=cpu", "--steps=2", "--warmup=1",
                      "--compile_mode=False", "--matmul_size=64", "--sample_tokens=8", "--prepare_mb=0.1",
                      f"--sample_dir={SAMPLE}", f"--ranks={GPT2_RANKS}", f"--json_path={out}")
    assert "x baseline" in proc.stdout and "tiktoken batch encoding alone" in proc.stdout
    r = json.loads(out.read_text())
    assert r["matmul"]["float32"] > 0 and r["matmul"]["bfloat16"] > 0
    assert r["train"]["baseline"]["dtype"] == "float32" and r["train"]["train.py"]["tokens_per_s"] > 0
    assert [m for m in ("baseline", "allocator", "autocast", "fused", "train.py", "compiled") if m in r["train"]] == \
        ["baseline", "allocator", "autocast", "fused", "train.py"]  # compile_mode=False
    assert "nanogpt" not in r["train"]  # no --nanogpt_dir
    assert r["train"]["baseline"]["speedup"] == 1.0 and r["train"]["autocast"]["dtype"] == "bfloat16"
    assert 0 < r["train"]["train.py"]["mfu"] and r["train"]["train.py"]["peak_memory_gb"] > 0
    bpe, modern = (r["recipes"][f"config/tinystories_1m_{name}.py"] for name in ("bpe", "modern"))
    assert bpe["recipe"] == "GPT-2" and "qk_norm=True" in modern["recipe"]
    assert bpe["cost"] == 1.0 and modern["cost"] == pytest.approx(modern["ms_per_step"] / bpe["ms_per_step"])
    assert "recipes: train.py's step of each config" in proc.stdout
    assert r["sample"]["batch1_cache"] > 0 and r["sample"]["batch8_reforward"] > 0
    assert r["sample"]["batch1_cache_int8"] > 0 and r["sample"]["batch1_cache_float32"] > 0
    assert r["prepare"]["10x"]["mb"] > 5 * r["prepare"]["1x"]["mb"] > 0  # 10 copies of train, one validation
    assert r["prepare"]["1x"]["peak_rss_mb"] >= r["prepare"]["1x"]["peak_anon_mb"] > 0
    assert r["prepare"]["tiktoken_batch"]["tokens_per_s"] > 0


def test_bench_refuses_a_nanogpt_dir_without_train_py(tmp_path):
    proc = run_script("bench.py", f"--nanogpt_dir={tmp_path}", check=False)
    assert_user_error(proc, "nanogpt_dir", "has no train.py")
