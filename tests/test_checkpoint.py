"""Checkpoints checked before use: pickles that would run code, model_args and tokenizers of wrong types, weights
that do not fit their model_args, meta.json's counts, and models too large for memory."""
import json
import os
import re

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from configurator import UserError
from files import save_torch
from model import GPT, GPTConfig
from prepare import read_meta
from conftest import TINY_ARGS, assert_user_error, run_script, tiny_checkpoint


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint from the internet would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_cannot_run_code(tmp_path):
    from configurator import UserError
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "model_args": {}, "tokenizer": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_refused_pickle_does_not_suggest_weights_only_false(tmp_path):
    from checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"model": Evil(), "model_args": {}, "tokenizer": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert "could run code" in str(e.value) and "weights_only" not in str(e.value)


def test_checkpoints_and_meta_json_with_wrong_types_are_refused(tmp_path):
    model = GPT(GPTConfig(**TINY_ARGS))
    spec = {"kind": "bpe", "name": "x", "json": "{}", "sha256": "0" * 64}
    for bad, message in (({**TINY_ARGS, "n_layer": "2"}, "n_layer must be int, got str"),
                         ({**TINY_ARGS, "bias": 1}, "bias must be bool"),
                         ({**TINY_ARGS, "heads": 2}, "unexpected keyword"),
                         ([1, 2], "model_args is a list")):
        save_torch({"model": model.state_dict(), "model_args": bad, "tokenizer": spec}, tmp_path / "c.pt")
        with pytest.raises(UserError, match=f"c.pt is damaged or not from this project: .*{message}"):
            load_checkpoint(tmp_path / "c.pt")
    save_torch({"model": model.state_dict(), "model_args": TINY_ARGS, "tokenizer": {**spec, "json": 5}},
                    tmp_path / "c.pt")
    with pytest.raises(UserError, match="lacks text fields json"):
        load_checkpoint(tmp_path / "c.pt")
    from checkpoint import load_model
    save_torch({"model": model.state_dict(), "model_args": TINY_ARGS, "tokenizer": spec}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="tokenizer 'x' cannot be built from its description"):
        load_model(tmp_path / "c.pt")  # spec["json"] is not a tokenizer.json

    meta = {"vocab_size": 64, "dtype": "uint16", "tokenizer": {"sha256": "0" * 64},
            "splits": {s: {"documents": 1, "tokens": 10, "bytes": 40} for s in ("train", "validation")}}
    for s in ("train", "validation"):
        np.zeros(10, np.uint16).tofile(tmp_path / f"{s}.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path)[1] == {"train": "", "validation": ""}
    for path, value in ((("splits", "train", "bytes"), 0), (("splits", "validation", "tokens"), "10"),
                        (("vocab_size",), 64.0)):
        broken = json.loads(json.dumps(meta))
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (tmp_path / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="meta.json is damaged .*not a positive whole number"):
            read_meta(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model": [1, 2]}, "the 'model' entry) are a list, not a dict of tensors"),
    ({"model": {"x": 1}}, "hold entries that are not tensors: x"),
    ({"model_args": {"vocab_size": 320, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}},
     "missing transformer.h.1"),
    ({"model_args": {"vocab_size": 640, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}},
     "transformer.wte.weight is (320, 16), not (640, 16)"),
])
def test_checkpoints_are_checked_key_by_key_before_use(tmp_path, tiny_models, change, message):
    from checkpoint import load_checkpoint
    from files import save_torch as save_checkpoint
    save_checkpoint(tiny_checkpoint(tiny_models[0]["tok"], **change), tmp_path / "x.pt")
    with pytest.raises(UserError, match=re.escape(message)):
        load_checkpoint(str(tmp_path / "x.pt"))


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    from checkpoint import check_fits
    huge = {"vocab_size": 50304, "block_size": 1024, "n_layer": 400, "n_head": 64, "n_embd": 16384}
    with pytest.raises(UserError, match=r"this model has [\d,]+M parameters: its weights need about [\d,.]+ GB"):
        check_fits(huge, "cpu")  # 1.3e12 parameters, 5 TB: no machine running these tests has that free
    check_fits({**huge, "n_layer": 1, "n_embd": 64, "n_head": 2}, "cpu")


@pytest.mark.slow
def test_checkpoints_from_elsewhere_and_huge_models_are_one_line(tmp_path, tiny_data, tiny_models):
    from conftest import TINY
    from files import save_torch
    tok = tiny_models[0]["tok"]
    save_torch(tiny_checkpoint(tok, model=["not", "a", "dict"]), tmp_path / "list.pt")
    wide = tiny_checkpoint(tok)
    wide["model_args"]["n_embd"] = 32
    save_torch(wide, tmp_path / "wide.pt")
    for name, message in (("list.pt", "the 'model' entry) are a list"), ("wide.pt", "do not fit its model_args")):
        proc = run_script("train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/ft",
                          f"--init_from={tmp_path / name}", check=False)
        assert_user_error(proc, name, message)
    proc = run_script("train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/huge", "--n_layer=400",
                      "--n_embd=16384", "--n_head=64", check=False)
    assert_user_error(proc, "M parameters: training (weights, gradients and the optimizer's moments) need about")
    # absurd depths are counted, not built: refused at once (building one on the meta device took minutes to
    # forever), and nothing is left in out_dir
    for n_layer in ("1000000", str(10 ** 100)):
        proc = run_script("train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/deep",
                          f"--n_layer={n_layer}", check=False, timeout=120)
        assert_user_error(proc, "M parameters: training")
        assert not (tmp_path / "deep").exists()
    # a checkpoint whose model_args describe far more weights than it holds is refused before any model is built
    deep = tiny_checkpoint(tok)
    deep["model_args"]["n_layer"] = 10 ** 6
    save_torch(deep, tmp_path / "deep.pt")
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--checkpoint=deep.pt", "--device=cpu", check=False,
                      timeout=120)
    assert_user_error(proc, "deep.pt", "do not fit its model_args", "parameters, the weights hold")


@pytest.mark.parametrize("recipe", [{}, {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True,
                                         "tie_embeddings": False, "bias": False}, {"mlp": "relu2", "norm": "rmsnorm"}])
def test_parameters_are_counted_from_the_shape_as_the_built_model_counts_them(recipe):
    from checkpoint import count_params
    for shape in ({"n_layer": 2, "n_head": 2, "n_embd": 32}, {"n_layer": 3, "n_head": 3, "n_embd": 48}):
        config = GPTConfig(vocab_size=100, block_size=16, **shape, **recipe)
        assert count_params(config) == GPT(config).num_params()
