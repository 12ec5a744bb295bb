"""export.py --format=gguf: a checkpoint becomes a GGUF file that llama.cpp runs with this project's function and
token ids. llama.cpp is run in-process through llama-cpp-python (the library that llama-cli, llama-server, Ollama's
and LM Studio's llama.cpp engines are built on), for each architecture (gpt2, llama, qwen3) over GPT-2's ranks and
over a BPE vocabulary trained here: it tokenizes text to our ids, computes our logits, and continues a prompt
greedily with our tokens; float16 and q8_0 files load and stay close; a recipe llama.cpp cannot run is one line.

Tolerances (max |logit difference|; the logits of these random tiny models span about +-5), measured with
llama-cpp-python 0.3.36 (llama.cpp 0c1e570) on a CPU:
- llama and qwen3, float32 file, float32 KV cache: 1e-4 (measured 4e-6 to 9e-6: float32 rounding, in another order).
- gpt2: llama.cpp's gpt2 has GPT-2's tanh approximation of GELU, and on the CPU looks it up in a float16 table
  (ggml_vec_gelu_f32 with GGML_GELU_FP16); ours is the exact erf GELU: 2e-2 (measured 2e-3 to 3e-3). Against our
  model with llama.cpp's GELU (ggml_gelu) 2e-3 (measured 5e-4: an input that differs in its last float32 bit can
  round to the neighbouring float16 and move the output by one float16 step).
- llama.cpp's default KV cache, float16 keys and values (relative error 2^-11): 3e-2 (measured 3e-3 to 5e-3).
- float16 file: 3e-2 (measured 3e-3 to 7e-3). q8_0 file: 0.5 (measured 0.1 to 0.26: 8-bit weights, and llama.cpp's
  CPU rounds the activations to 8 bits too for the Q8_0 dot products); both files are also checked byte for byte
  against what llama.cpp's own quantizer makes of the float32 file.
The tests are marked slow (they start export.py and write files of 2 to 20 MB) apart from the refusals. They skip
without gguf or llama-cpp-python (a user's machine without requirements-dev.txt); under CI=true that is a failure.
"""
import importlib.util
import itertools
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import GPT2_RANKS, SAMPLE, assert_user_error, run_script, save_random_model

from configurator import UserError
from files import save_torch
from model import GPT, SAMPLING_DEFAULTS, GPTConfig
from prepare import train_bpe
from test_export import TEXTS
from tokenizer import EOT, load_tokenizer

PIP = ("pip install gguf llama-cpp-python (both in requirements-dev.txt; llama-cpp-python compiles llama.cpp, "
       "about 5 minutes)")
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_LLAMA_CPP = HAVE_GGUF and importlib.util.find_spec("llama_cpp") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=f"needs the gguf package: {PIP}")
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=f"needs llama.cpp's Python bindings: {PIP}")

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MODERN = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
RECIPES = {"gpt2": {}, "llama": MODERN, "qwen3": {**MODERN, "qk_norm": True}}
# (architecture, vocabulary): GPT-2's ranks (tiktoken) or a BPE vocabulary trained on the sample (tokenizers)
CASES = [(arch, vocab) for arch in RECIPES for vocab in ("gpt2", "bpe")]
# more text than test_export's: digits, runs of spaces and newlines, contractions, combining marks, the literal
# special token, and llama.cpp's own pre-tokenizer check text (convert_hf_to_gguf.py's chktxt)
MORE_TEXTS = [
    "", "3 33 333 3333 33333 333333 1234567890 3.3 3..3", "  two spaces, then two after  ", "\n \n\n \t \t\t \t\n",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "e\u0301 combining, \ufb01 ligature, \u01c4, \u210c, \u00a0no-break and \u2009thin spaces",
    "The story ends here.<|endoftext|>Once upon a time", "<|endoftext|>",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3"
    "\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!??????",
]

F32_TOL, GGML_GELU_TOL, GPT2_TOL, F16_CACHE_TOL = 1e-4, 2e-3, 2e-2, 3e-2
FILE_TOL = {"float16": 3e-2, "q8_0": 0.5}
_exact_gelu = F.gelu


def ggml_gelu(x, approximate="none"):
    """GELU as llama.cpp computes it on the CPU (ggml_vec_gelu_f32 with GGML_GELU_FP16): GPT-2's tanh
    approximation looked up in a float16 table, so x is rounded to float16 and so is the result; 0 at or below -10
    and x at or above 10."""
    y = _exact_gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def make_checkpoint(out_dir, tok, arch, tie, seed=0):
    """A 2-layer GPT of `arch`'s recipe over `tok`, n_embd 96 (rows that split into Q8_0's blocks of 32, SwiGLU's
    hidden width 256), block_size 64, saved with every parameter randomised (conftest.save_random_model).
    Returns the model (eval mode)."""
    return save_random_model(out_dir, tok, seed, block_size=64, n_embd=96,
                             **{"bias": arch == "gpt2", **RECIPES[arch], "tie_embeddings": tie})


def cpu_has_amx():
    """Whether this CPU has AMX-INT8 (Intel Xeon from Sapphire Rapids on), from /proc/cpuinfo (False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


def load_llama(path, n_ctx=256, f32_cache=True, repack=True):
    """llama.cpp's model and context (n_ctx tokens: it rounds them up to a multiple of 256 anyway) for the GGUF
    file `path`, every position's logits kept (logits_all), one thread (the tests run on two workers), keys and
    values cached in float32 unless f32_cache=False (llama.cpp's default is float16). repack=False: the weights
    stay in the file's layout (llama.cpp's --no-repack), without the CPU's extra buffer types (AMX, repacked
    quantized blocks)."""
    import llama_cpp
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as mp:
        if not repack:  # Llama.__init__ starts from these defaults and has no argument for this one
            mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repack)
        return llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=n_ctx, n_threads=1,
                               n_threads_batch=1, **cache)


def llama_logits(llm, ids):
    """llama.cpp's next-token logits at every position of `ids` (a list of int): (len(ids), vocab) float32."""
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)


def our_logits(model, ids):
    with torch.no_grad():
        idx = torch.tensor([ids])
        return model(idx, torch.zeros_like(idx))[0][0]


@pytest.fixture(scope="module")
def bpe_tok():
    """A 1,024-id BPE vocabulary trained on the sample, as prepare.py --tokenizer=bpe trains one."""
    docs = [d for d in (SAMPLE / "train.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return train_bpe(docs, 1024)


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{v}" for a, v in CASES])
def exported(request, tmp_path_factory, bpe_tok):
    """export.py --format=gguf of a tiny model of each architecture and vocabulary (tied and untied heads, with
    and without biases), over an earlier export with --force, then loaded by llama.cpp.
    Returns a dict: arch, vocab ("gpt2" or "bpe"), folder, ours (model), tok, llm (llama_cpp.Llama, float32 cache)."""
    arch, vocab = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{vocab}")
    tok = load_tokenizer(str(GPT2_RANKS)) if vocab == "gpt2" else bpe_tok
    ours = make_checkpoint(root / "out", tok, arch, tie=(vocab == "gpt2") == (arch != "qwen3"))
    folder = root / "gguf"
    folder.mkdir()
    (folder / "old.txt").write_text("replaced")
    (folder / ".tinystories-export").write_text("{}")  # an earlier export: --force may replace it
    proc = run_script("export.py", f"--out_dir={root / 'out'}", f"--export_dir={folder}", "--format=gguf",
                      "--force", env=OFFLINE)
    assert f"as {arch} " in proc.stdout and "llama-completion -m" in proc.stdout
    assert sorted(os.listdir(root)) == ["gguf", "out"]  # nothing left beside it
    llm = load_llama(folder / "model.gguf")
    yield {"arch": arch, "vocab": vocab, "folder": folder, "ours": ours, "tok": tok, "llm": llm}
    llm.close()


@pytest.mark.slow
@needs_llama_cpp
def test_the_folder_holds_a_gguf_file_with_llama_cpp_metadata_and_an_ollama_modelfile(exported):
    import gguf
    folder, ours, tok, arch = exported["folder"], exported["ours"], exported["tok"], exported["arch"]
    assert sorted(os.listdir(folder)) == [".tinystories-export", "Modelfile", "model.gguf"]
    reader = gguf.GGUFReader(folder / "model.gguf")

    def field(key):
        f = reader.fields[key]
        return f.contents()

    cfg = ours.config
    assert field("general.architecture") == arch
    # gpt2: the position table is padded to 256 rows, the context llama.cpp rounds every context up to
    assert field(f"{arch}.context_length") == (256 if arch == "gpt2" else cfg.block_size)
    assert field(f"{arch}.block_count") == cfg.n_layer
    assert field(f"{arch}.embedding_length") == cfg.n_embd and field(f"{arch}.attention.head_count") == cfg.n_head
    assert field(f"{arch}.feed_forward_length") == (4 * cfg.n_embd if arch == "gpt2" else 256)
    eps = f"{arch}.attention.layer_norm_{'epsilon' if arch == 'gpt2' else 'rms_epsilon'}"
    assert field(eps) == pytest.approx(1e-5)
    if arch != "gpt2":
        assert field(f"{arch}.rope.freq_base") == 10000.0 and field(f"{arch}.rope.dimension_count") == 48
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.bos_token_id") == tok.eot_token
    assert field("tokenizer.ggml.add_bos_token") is False
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size and tokens[tok.eot_token] == EOT
    assert types[tok.eot_token] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.CONTROL) == 1
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    assert types[tok.vocab_size:] == [gguf.TokenType.UNUSED] * (cfg.vocab_size - tok.vocab_size)
    assert len(field("tokenizer.ggml.merges")) == tok.vocab_size - 257  # every token past the bytes and EOT
    assert field("general.sampling.temp") == pytest.approx(SAMPLING_DEFAULTS["temperature"])
    assert field("general.sampling.top_p") == pytest.approx(SAMPLING_DEFAULTS["top_p"])
    names = {t.name: t for t in reader.tensors}
    if arch == "gpt2":
        table = names["position_embd.weight"].data
        assert table.shape == (256, cfg.n_embd) and (table[cfg.block_size:] == table[cfg.block_size - 1]).all()
    assert ("output.weight" in names) == (not cfg.tie_embeddings)  # tied: llama.cpp reuses token_embd
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)
    assert json.loads((folder / ".tinystories-export").read_text())["checkpoint"].endswith("best_model_params.pt")
    modelfile = (folder / "Modelfile").read_text().splitlines()
    for line in ("FROM ./model.gguf", 'TEMPLATE "{{ .Prompt }}"', f'PARAMETER stop "{EOT}"',
                 "PARAMETER temperature 0.8", "PARAMETER top_p 0.95", "PARAMETER top_k 0", "PARAMETER repeat_penalty 1",
                 f"PARAMETER num_ctx {cfg.block_size}"):
        assert line in modelfile


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_tokenizes_text_to_our_ids(exported):
    llm, tok = exported["llm"], exported["tok"]
    for text in TEXTS + MORE_TEXTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == text.encode(), text
    # parsing special tokens, llama.cpp reads a typed <|endoftext|> as the separator (our Tokenizer never does)
    assert llm.tokenize(f"The end.{EOT}".encode(), add_bos=False, special=True) == tok.encode("The end.") + [
        tok.eot_token]
    assert llm.token_eos() == llm.token_bos() == tok.eot_token


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_computes_our_logits(exported, monkeypatch):
    llm, ours, tok, arch = exported["llm"], exported["ours"], exported["tok"], exported["arch"]
    rng = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (ours.config.block_size,), generator=rng).tolist()  # a full context
    expected, got = our_logits(ours, ids), llama_logits(llm, ids)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    if arch == "gpt2":  # llama.cpp's GELU: the tanh approximation through a float16 table (see ggml_gelu)
        assert diff < GPT2_TOL
        # and it carries on past block_size (on rows that repeat the last position) instead of aborting
        assert torch.equal(llama_logits(llm, ids + ids[:16])[:len(ids)], got)
        monkeypatch.setattr(F, "gelu", ggml_gelu)
        expected = our_logits(ours, ids)
        assert (got - expected).abs().max().item() < GGML_GELU_TOL
    else:
        assert diff < F32_TOL
    # llama.cpp's default: keys and values cached in float16
    default = load_llama(exported["folder"] / "model.gguf", f32_cache=False)
    try:
        assert (llama_logits(default, ids) - expected).abs().max().item() < F16_CACHE_TOL
    finally:
        default.close()


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_continues_a_prompt_greedily_with_our_tokens(exported):
    llm, ours, tok = exported["llm"], exported["ours"], exported["tok"]
    prompt, mine = clear_greedy_prompt(llm, ours, tok)
    # its greedy sampler, with the key/value cache; llama-cpp-python's generate penalises repeats unless told not to
    theirs = list(itertools.islice(llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True), 32))
    assert theirs == mine


# Greedy decoding of two implementations can only agree where the model's choice is clear: a random model may
# have two tokens within rounding of each other somewhere on its path (seen with the stand-in vocabulary, which a
# clone without ../shared uses). So the prompt is the first of these whose whole path is clear.
PROMPTS = ["Once upon a time", "One day", "Lily and Tom", "The little dog", "She was happy", "They played", "Ben",
           "In the park", "The sun", "Mom said"]


def clear_greedy_prompt(llm, ours, tok):
    """The first prompt of PROMPTS (as ids) whose greedy 32-token path under our model (returned with it) is not
    degenerate and, at every step, has its best token ahead of the second by more than twice the largest
    difference between our logits and llama.cpp's on that path: there the two must choose the same tokens."""
    for text in PROMPTS:
        prompt = tok.encode(text)
        # over every row of the head, as llama.cpp's greedy sampler: a random model's padding rows can win
        mine = ours.generate(torch.tensor([prompt]), 32, temperature=0)[0, len(prompt):].tolist()
        path = prompt + mine[:-1]
        logits = our_logits(ours, path)[len(prompt) - 1:]
        top2 = logits.topk(2, dim=-1).values
        difference = (llama_logits(llm, path)[len(prompt) - 1:] - logits).abs().max()
        if len(set(mine)) >= 8 and (top2[:, 0] - top2[:, 1]).min() > 2 * difference:
            return prompt, mine
    pytest.fail(f"none of {len(PROMPTS)} prompts gives a greedy path whose choices are clear: the two models "
                f"differ by more than the model's own margins")


@pytest.mark.slow
@needs_llama_cpp
def test_float16_and_q8_0_files_are_llama_cpp_s_own_and_stay_close(exported, tmp_path):
    """The float16 and q8_0 files hold the very bytes that llama.cpp's quantizer (llama-quantize) makes of the
    float32 export, load, and give logits close to ours. float16 over the BPE vocabulary only: the larger GPT-2
    vocabulary adds time and nothing that q8_0 does not check."""
    import ctypes

    import gguf
    import llama_cpp

    import export
    ours, tok, arch = exported["ours"], exported["tok"], exported["arch"]
    for dtype in ("float16", "q8_0") if exported["vocab"] == "bpe" else ("q8_0",):
        path = tmp_path / f"{dtype}.gguf"
        export.write_gguf(export.gguf_writer(ours, tok, arch, dtype), path)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16 if dtype == "float16" else llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = 1
        theirs = tmp_path / f"{dtype}-quantized.gguf"
        assert llama_cpp.llama_model_quantize(str(exported["folder"] / "model.gguf").encode(), str(theirs).encode(),
                                              ctypes.byref(params)) == 0
        mine, quantized = gguf.GGUFReader(path).tensors, {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert sorted(t.name for t in mine) == sorted(quantized)
        want = "F16" if dtype == "float16" else "Q8_0"
        for t in mine:  # the matrices in `dtype`; vectors and GPT-2's position table in float32, as llama.cpp does
            one_d = len(t.shape) == 1 or t.name == "position_embd.weight"
            assert t.tensor_type.name == ("F32" if one_d else want), t.name
            assert t.tensor_type == quantized[t.name].tensor_type and (t.data == quantized[t.name].data).all(), t.name
        # llama.cpp 0c1e570's AMX kernels crash on any Q8_0 model (its own llama-quantize's output too) as soon as
        # a batch holds more than one token (ggml-org/llama.cpp#20824): on such a CPU, Q8_0 runs without them
        llm = load_llama(path, repack=not (dtype == "q8_0" and cpu_has_amx()))
        try:
            rng = torch.Generator().manual_seed(1)
            ids = torch.randint(0, tok.vocab_size, (ours.config.block_size,), generator=rng).tolist()
            assert (llama_logits(llm, ids) - our_logits(ours, ids)).abs().max().item() < FILE_TOL[dtype], dtype
        finally:
            llm.close()


@pytest.mark.parametrize("switches,nearest,fix", [
    ({"mlp": "relu2"}, "gpt2", "--mlp=gelu"),
    ({**MODERN, "bias": True}, "llama", "--bias=False"),
    ({"pos_embedding": "rope"}, "gpt2", "--pos_embedding=learned"),
])
def test_recipes_llama_cpp_cannot_run_are_refused_in_one_line(switches, nearest, fix):
    from export import architecture
    with pytest.raises(UserError, match=f"^llama.cpp has no architecture that runs this model's recipe \\(.*\\); "
                                        f"the nearest it runs is {nearest}, trained with {fix}$"):
        architecture(switches, "llama.cpp")


@pytest.mark.parametrize("flag,message", [("--format=onnx", "--format='onnx' is not one of 'hf'"),
                                          ("--gguf_dtype=q4_0", "--gguf_dtype='q4_0' is not one of 'float32'")])
def test_unknown_format_or_dtype_is_one_line(flag, message, monkeypatch, tmp_path):
    import export
    for k in ("out_dir", "export_dir", "format", "gguf_dtype"):
        monkeypatch.setattr(export, k, getattr(export, k))  # main sets its settings; undo that afterwards
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={tmp_path}", f"--export_dir={tmp_path / 'x'}",
                                      "--format=gguf", flag])
    with pytest.raises(UserError, match=message.replace("(", "\\(")):
        export.main()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@needs_gguf
def test_export_refuses_a_recipe_llama_cpp_cannot_run_and_writes_nothing(tmp_path):
    tok = load_tokenizer(str(GPT2_RANKS))
    args = {"vocab_size": math.ceil(tok.vocab_size / 64) * 64, "block_size": 16, "n_layer": 1, "n_head": 2,
            "n_embd": 16, "dropout": 0.0, "mlp": "relu2"}
    save_torch({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "tokenizer": tok.spec,
                "config": {}, "iter_num": 0}, tmp_path / "out" / "best_model_params.pt")
    proc = run_script("export.py", f"--out_dir={tmp_path / 'out'}", f"--export_dir={tmp_path / 'gguf'}",
                      "--format=gguf", check=False, env=OFFLINE)
    assert_user_error(proc, "llama.cpp has no architecture that runs this model's recipe (mlp=relu2)",
                      "the nearest it runs is gpt2, trained with --mlp=gelu")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow  # export.py as a subprocess
def test_export_without_gguf_names_the_pip_install(tmp_path):
    blocked = tmp_path / "blocked" / "gguf"  # a gguf package that cannot be imported: a machine without it
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run_script("export.py", f"--out_dir={tmp_path}", f"--export_dir={tmp_path}/gguf", "--format=gguf",
                      check=False, env={"PYTHONPATH": str(blocked.parent)})
    assert_user_error(proc, "export.py --format=gguf needs the gguf package: pip install gguf")
    assert not (tmp_path / "gguf").exists()
