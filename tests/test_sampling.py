"""Sampling at a temperature: one so small that dividing the logits by it overflows still samples greedily; a
prompt file as an editor writes it."""
import pytest
import torch

from conftest import run_script, tiny_checkpoint


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-37])
def test_a_vanishing_temperature_samples_greedily(temperature):
    from model import sample_next
    torch.manual_seed(0)
    logits = torch.randn(8, 300) * 5 - 40  # all negative: a shift-free division would give -inf everywhere
    greedy = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature), greedy)
    assert torch.equal(sample_next(logits, temperature, top_k=5, top_p=0.5), greedy)


def test_generation_at_a_vanishing_temperature_is_greedy(tiny_models):
    model = tiny_models[0]["model"]
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 12, temperature=1e-300), model.generate(idx, 12, temperature=0))


@pytest.mark.slow  # sample.py as a subprocess
def test_a_prompt_file_with_a_byte_order_mark_prompts_its_text(tmp_path, tiny_models):
    from files import save_torch
    save_torch(tiny_checkpoint(tiny_models[0]["tok"]), tmp_path / "best_model_params.pt")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xef\xbb\xbfOnce upon a time\r\n")  # as Notepad saves it: a byte-order mark, CR LF
    proc = run_script("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{prompt}", "--device=cpu",
                      "--num_samples=1", "--max_new_tokens=3")
    assert proc.stdout.startswith("Once upon a time\n"), repr(proc.stdout[:40])  # no U+FEFF before the story
