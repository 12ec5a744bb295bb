"""Sampling at a temperature: one so small that dividing the logits by it overflows still samples greedily."""
import pytest
import torch


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
