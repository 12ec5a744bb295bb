"""Export a trained model as a Hugging Face `transformers` model folder (GPT-2, Llama or Qwen3), or as a GGUF file
that llama.cpp runs (and so Ollama and LM Studio, which run llama.cpp's files).

    python export.py --out_dir=out --export_dir=hf_model
    python export.py --out_dir=out --checkpoint=ckpt.pt --export_dir=hf_model --force
    python export.py --out_dir=out --export_dir=gguf_model --format=gguf [--gguf_dtype=float16|q8_0]

Loads out_dir/checkpoint (train.py's best_model_params.pt by default) and writes export_dir with
config.json, generation_config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json; or,
with --format=gguf, with model.gguf (weights, tokenizer and settings in one file) and an Ollama Modelfile.
The model's recipe (model.GPTConfig's switches) decides the architecture, and the folder loads without this
repository:

    GPT-2's recipe (learned positions, LayerNorm, GELU)                 -> GPT2LMHeadModel    (llama.cpp: gpt2)
    pos_embedding=rope, norm=rmsnorm, mlp=swiglu, bias=False           -> LlamaForCausalLM   (llama.cpp: llama)
    the same with qk_norm=True                                          -> Qwen3ForCausalLM   (llama.cpp: qwen3)

Every other combination (e.g. relu2, or rope with LayerNorm) has no transformers class nor llama.cpp architecture
and is refused.

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained("hf_model")
    tokenizer = AutoTokenizer.from_pretrained("hf_model")
    print(pipeline("text-generation", model="hf_model")("Once upon a time", max_new_tokens=50)[0]["generated_text"])

For GPT-2, differences that the files record: exact GELU (activation_function "gelu", not GPT-2's tanh
approximation "gelu_new"); a model trained with bias=False gets zero biases (GPT-2 always has them); the
embedding rows past the tokenizer's vocabulary (padding to a multiple of 64) are kept and listed in
generation_config.json's suppress_tokens, so generation never produces them (like sample.py's vocab_limit).
Like GPT-2, the exported model reads at most block_size tokens (n_positions); sample.py slides a window past it.
Llama and Qwen3 use the same rotary convention as model.apply_rope (rope_theta 10000, channel i paired with
i + head_size/2), so their weights need no permutation; max_position_embeddings is block_size, the length trained on.
In GGUF: llama.cpp's gpt2 has GPT-2's tanh GELU (the logits differ by a few thousandths); its llama pairs
rotary channels 2i and 2i+1, so the rows of the query and key weights are reordered (interleave_rope); its qwen3
pairs them as we do. The tokenizer goes in as llama.cpp's "gpt2" BPE with GPT-2's pre-tokenizer, which gives this
project's token ids; <|endoftext|> is bos and eos, and nothing is added to prompts. docs/export.md has the rest.
The export_dir is built in a temporary folder beside it (.NAME.tmp.*) and renamed into place when complete. An
existing, non-empty export_dir is only replaced with --force, and only if export.py wrote it (it holds a
.tinystories-export file): --force never deletes a training run or any other folder. The next export to the same
export_dir removes what a killed one left beside it (each export holds an OS lock on its folders while it runs),
and puts back a previous export that a killed one had moved aside (.NAME.old.*) but not yet replaced. The room
on the disk is checked before anything is written.
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict

import torch

from checkpoint import load_model
from configurator import UserError, configure, run
from model import NORM_EPS, ROPE_THETA, SAMPLING_DEFAULTS, GPTConfig, swiglu_hidden
from tokenizer import EOT, parse_ranks

# -----------------------------------------------------------------------------
out_dir = "out"                         # directory that holds the checkpoint
checkpoint = "best_model_params.pt"     # file name inside out_dir
export_dir = "hf_model"                 # the folder to write (the Hugging Face model, or model.gguf and Modelfile)
force = False                           # replace an existing, non-empty export_dir
format = "hf"                           # "hf": a Hugging Face transformers folder; "gguf": a GGUF file for llama.cpp
gguf_dtype = "float32"                  # --format=gguf: the matrices as "float32", "float16" or "q8_0" (8-bit)
# -----------------------------------------------------------------------------

# Our nn.Linear weights are (out, in); GPT-2's Conv1D layers hold (in, out).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_dict(model):
    """The weights of our GPT under GPT2LMHeadModel's names, ready for safetensors.

    Our parameter names are GPT-2's already (transformer.wte, .wpe, .h.{i}.ln_1, .attn.c_attn, .attn.c_proj,
    .ln_2, .mlp.c_fc, .mlp.c_proj, .ln_f). The four matmul weights are transposed into Conv1D's (in, out) layout;
    a bias=False model gets zero biases, which GPT-2 always has; a tied lm_head.weight is left out
    (transformers restores the tie to transformer.wte.weight from tie_word_embeddings).
    Returns dict name -> contiguous float32 CPU tensor (vocab_size x n_embd for wte, block_size x n_embd for wpe).
    """
    params = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
              if k != "lm_head.weight" or not model.config.tie_embeddings}
    out = {}
    for name, w in params.items():
        out[name] = (w.t() if name.endswith(_CONV1D) else w).contiguous()
        if name.endswith(".weight") and not name.endswith((".wte.weight", ".wpe.weight", "lm_head.weight")):
            bias = name[:-len("weight")] + "bias"
            if bias not in params:  # bias=False: the same function with a zero bias
                out[bias] = torch.zeros(out[name].shape[-1] if name.endswith(_CONV1D) else w.shape[0])
    return out


# The recipes that have a transformers class: architecture -> the switch values it needs (model.GPTConfig).
ARCHITECTURES = {
    "GPT2LMHeadModel": {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False},
    "LlamaForCausalLM": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "bias": False},
    "Qwen3ForCausalLM": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False},
}


# The same recipes in llama.cpp (GGUF's general.architecture): transformers class -> llama.cpp architecture.
GGUF_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}


def architecture(model_args, runner="transformers"):
    """The transformers class that computes the same function as a model with these GPTConfig fields (for
    runner="llama.cpp", look its llama.cpp architecture up in GGUF_ARCHITECTURES: the recipes are the same).
    Raises UserError for a recipe with none, naming the nearest one that exports and the switches to change."""
    args = {**asdict(GPTConfig()), **model_args}  # a partial dict: the other fields at their defaults
    diffs = {name: {k: v for k, v in need.items() if args[k] != v} for name, need in ARCHITECTURES.items()}
    for name, diff in diffs.items():
        if not diff:
            return name
    nearest = min(diffs, key=lambda name: len(diffs[name]))
    fix = " ".join(f"--{k}={v}" for k, v in diffs[nearest].items())
    if runner == "llama.cpp":
        have = ", ".join(f"{k}={args[k]}" for k in diffs[nearest])
        raise UserError(f"llama.cpp has no architecture that runs this model's recipe ({have}); the nearest it runs is "
                        f"{GGUF_ARCHITECTURES[nearest]}, trained with {fix}")
    raise UserError(f"no transformers class computes this model's recipe; the nearest that exports is {nearest}, "
                    f"trained with {fix}")


def llama_state_dict(model):
    """The weights of our GPT under LlamaForCausalLM's (or Qwen3ForCausalLM's) names: c_attn split into q_proj,
    k_proj and v_proj; c_fc into gate_proj (its first half of rows) and up_proj; c_proj into o_proj and
    down_proj; ln_1, ln_2, ln_f into input_layernorm, post_attention_layernorm and norm; q_norm and k_norm keep
    their names. nn.Linear's (out, in) layout is the same on both sides. lm_head.weight only when untied.
    Returns dict name -> contiguous float32 CPU tensor."""
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd.pop("transformer.wte.weight"),
           "model.norm.weight": sd.pop("transformer.ln_f.weight")}
    lm_head = sd.pop("lm_head.weight")
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = lm_head
    for i in range(model.config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = sd.pop(ours + "attn.c_attn.weight").chunk(3)
        gate, up = sd.pop(ours + "mlp.c_fc.weight").chunk(2)
        out.update({theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                    theirs + "self_attn.v_proj.weight": v,
                    theirs + "self_attn.o_proj.weight": sd.pop(ours + "attn.c_proj.weight"),
                    theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                    theirs + "mlp.down_proj.weight": sd.pop(ours + "mlp.c_proj.weight"),
                    theirs + "input_layernorm.weight": sd.pop(ours + "ln_1.weight"),
                    theirs + "post_attention_layernorm.weight": sd.pop(ours + "ln_2.weight")})
        for name in ("q_norm", "k_norm"):
            if ours + f"attn.{name}.weight" in sd:
                out[theirs + f"self_attn.{name}.weight"] = sd.pop(ours + f"attn.{name}.weight")
    assert not sd, f"weights without a Llama name: {sorted(sd)}"  # a bug, not a user error
    return {k: v.contiguous() for k, v in out.items()}


def llama_config(model_args, eot, name):
    """config.json for LlamaForCausalLM or Qwen3ForCausalLM (`name`) from our GPTConfig fields (`model_args`) and
    the end-of-text id `eot`. rope_theta is written both as transformers 5 reads it (rope_parameters) and as 4.x
    does."""
    n_embd, n_head = model_args["n_embd"], model_args["n_head"]
    return {
        "architectures": [name], "model_type": "qwen3" if name.startswith("Qwen3") else "llama",
        "vocab_size": model_args["vocab_size"], "hidden_size": n_embd, "intermediate_size": swiglu_hidden(n_embd),
        "num_hidden_layers": model_args["n_layer"], "num_attention_heads": n_head, "num_key_value_heads": n_head,
        "head_dim": n_embd // n_head, "hidden_act": "silu", "max_position_embeddings": model_args["block_size"],
        "rms_norm_eps": NORM_EPS, "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": model_args["dropout"],
        "use_sliding_window": False, "initializer_range": 0.02,
        "tie_word_embeddings": model_args.get("tie_embeddings", True), "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def gpt2_config(model_args, eot):
    """config.json for GPT2LMHeadModel from our GPTConfig fields (`model_args`) and the end-of-text id `eot`.
    n_ctx duplicates n_positions for tools that still read it (llama.cpp's convert_hf_to_gguf.py does)."""
    n_embd, dropout = model_args["n_embd"], model_args["dropout"]
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model_args["vocab_size"], "n_positions": model_args["block_size"],
        "n_ctx": model_args["block_size"], "n_embd": n_embd, "n_layer": model_args["n_layer"],
        "n_head": model_args["n_head"], "n_inner": 4 * n_embd,
        "activation_function": "gelu",  # exact GELU, as nn.GELU() in model.MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": model_args.get("tie_embeddings", True), "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def generation_config(eot, tokenizer_vocab, vocab_size):
    """generation_config.json: sample.py's defaults (model.SAMPLING_DEFAULTS; top_k 0: no cut), stop at
    <|endoftext|> (id `eot`, also the padding id for batches), and never the padding ids
    tokenizer_vocab..vocab_size-1, which the tokenizer cannot decode.
    No max_length: transformers then adds 20 tokens unless given max_new_tokens, and caps that default at
    n_positions (a max_length here would make every call with max_new_tokens log a warning)."""
    cfg = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": True,
           **{k: SAMPLING_DEFAULTS[k] for k in ("temperature", "top_p", "top_k")}}
    if tokenizer_vocab < vocab_size:
        cfg["suppress_tokens"] = list(range(tokenizer_vocab, vocab_size))
    return cfg


def _byte_chars():
    """GPT-2's reversible map from the 256 byte values to printable characters (Radford et al. 2019,
    encoder.py): printable Latin-1 bytes stand for themselves, the other 68 get the characters from U+0100 on.
    This is the alphabet of byte-level BPE vocabularies in tokenizer.json (e.g. " the" is "Ġthe")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return chars


def _last_merge(token, rank, ranks):
    """The two tokens that byte-level BPE joins last when it builds `token` (bytes) with the merges of ranks
    below `rank`: run tiktoken's algorithm on the token's bytes (join the adjacent pair whose join has the lowest
    rank, leftmost first) until two parts remain. Returns (left, right) bytes, or None if the token cannot be
    built that way."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return None
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return tuple(parts) if len(parts) == 2 and all(ranks.get(p, rank) < rank for p in parts) else None


def tiktoken_to_tokenizer_json(spec):
    """A Hugging Face tokenizer.json equivalent to a tiktoken spec (kind "tiktoken", see tokenizer.Tokenizer).

    The vocabulary is the ranks (id = rank), written in GPT-2's byte alphabet (_byte_chars). tiktoken keeps
    no merge list: it joins whichever adjacent pair forms the lowest-ranked token. The merges are recovered by
    building each token of 2+ bytes, in rank order, from lower-ranked tokens (_last_merge); for GPT-2's ranks this
    gives its 50,000 merges, one per token, and the same ids as tiktoken. GPT-2's byte-level pre-tokenizer (the
    split pattern of spec["pat_str"]) and decoder; <|endoftext|> is a special token with id len(ranks).
    Returns str. Raises UserError for another split pattern or a token that merges cannot build.
    """
    from tiktoken_ext.openai_public import r50k_pat_str
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    if spec["pat_str"] != r50k_pat_str:
        raise UserError(f"tokenizer {spec['name']} splits text with a pattern other than GPT-2's; export.py can only "
                        f"write GPT-2's byte-level pre-tokenizer")
    ranks = parse_ranks(spec["ranks"])
    chars = _byte_chars()

    def text(token):
        return "".join(chars[b] for b in token)

    merges, unbuildable = [], []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _last_merge(token, rank, ranks)
            if pair is None:
                unbuildable.append(token)
            else:
                merges.append((text(pair[0]), text(pair[1])))
    if unbuildable:
        raise UserError(f"{len(unbuildable)} tokens of {spec['name']} (e.g. {unbuildable[0]!r}) cannot be built by "
                        f"merging lower-ranked tokens, so they have no Hugging Face BPE equivalent")
    hf = HFTokenizer(models.BPE(vocab={text(t): r for t, r in ranks.items()}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return hf.to_str()


def with_string_merges(tokenizer_json):
    """The same tokenizer.json with BPE merges written as "left right" strings instead of [left, right] pairs.
    `tokenizers` 0.20 and later write pairs and read both; 0.19 (what transformers 4.40 to 4.44 use) reads only
    strings. Left unchanged if a merge part holds a space (byte-level vocabularies never do: space is "Ġ")."""
    data = json.loads(tokenizer_json)
    merges = data.get("model", {}).get("merges")
    if not merges or isinstance(merges[0], str) or any(" " in part for pair in merges for part in pair):
        return tokenizer_json
    data["model"]["merges"] = [" ".join(pair) for pair in merges]
    return json.dumps(data, ensure_ascii=False)


def tokenizer_files(tok, block_size):
    """{file name: text} of the tokenizer files for `tok` (tokenizer.Tokenizer): tokenizer.json (converted from
    GPT-2 ranks, or a trained vocabulary's own file, with merges as strings: with_string_merges) and
    tokenizer_config.json. The class is PreTrainedTokenizerFast, which uses tokenizer.json as written;
    <|endoftext|> is the bos, eos and unk token."""
    spec = tok.spec
    tokenizer_json = with_string_merges(
        tiktoken_to_tokenizer_json(spec) if spec["kind"] == "tiktoken" else spec["json"])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "model_max_length": block_size, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


# --- GGUF: one file that llama.cpp (and Ollama, LM Studio, which run llama.cpp's files) loads -------------------
# --gguf_dtype -> (general.file_type, the type of the matrices). Vectors (norm gains, biases) and GPT-2's position
# table stay float32, and a matrix whose rows do not split into Q8_0's blocks of 32 becomes float16, as llama.cpp's
# convert_hf_to_gguf.py writes them.
GGUF_DTYPES = {"float32": ("ALL_F32", "F32"), "float16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}


def _needs_gguf():
    try:
        import gguf
    except ImportError as e:  # optional: only --format=gguf writes GGUF (requirements-dev.txt has it)
        why = "" if e.name == "gguf" else f" (it is there, but importing it failed: {e})"
        raise UserError(f"export.py --format=gguf needs the gguf package: pip install gguf{why}") from None
    return gguf


def interleave_rope(w, n_head):
    """Rows of a query or key projection (n_head * head_dim, in), reordered from our rotary layout (channel i
    paired with i + head_dim/2: model.apply_rope, "rotate half", llama.cpp's NEOX) to the interleaved one of
    llama.cpp's "llama" architecture (channel 2i paired with 2i+1, its rope type NORM): row h*d + 2i + s is our
    row h*d + s*d/2 + i. The same permutation of both queries and keys leaves their dot products, and so the
    model's function, unchanged (LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py does this too)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_positions(config):
    """The rows of the position table in a gpt2 GGUF file, and its context_length: block_size rounded up to a
    multiple of 256. llama.cpp rounds every context up to a multiple of 256 tokens and aborts when a position
    passes the table (GGML_ASSERT(i01 >= 0 && i01 < ne01)), so a model with block_size 128 would stop
    `llama-completion -n 200` half-way. The added rows copy the last trained position: what comes after
    block_size tokens is text the model was never trained to continue (sample.py slides a window instead)."""
    return math.ceil(config.block_size / 256) * 256


def gguf_tensors(model, arch):
    """The weights of our GPT under llama.cpp's tensor names for `arch` ("gpt2", "llama" or "qwen3";
    gguf.TENSOR_NAMES), as {name: contiguous float32 CPU tensor} in nn.Linear's (out, in) layout, which is GGUF's
    (ggml lists the dimensions the other way round).

    gpt2: c_attn stays one attn_qkv matrix; a bias=False model gets zero biases (llama.cpp's gpt2 needs them); the
    position table has gguf_positions rows.
    llama and qwen3: c_attn is split into attn_q, attn_k and attn_v, SwiGLU's c_fc into ffn_gate (its first half
    of rows) and ffn_up; for llama the rows of attn_q and attn_k are interleaved (interleave_rope). The head is
    left out when it is tied: llama.cpp then uses token_embd as the output matrix."""
    gguf = _needs_gguf()
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}

    def name(tensor, i=None, kind="weight"):
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, tensor)].format(bid=i) + "." + kind

    out = {name("TOKEN_EMBD"): sd.pop("transformer.wte.weight")}
    head = sd.pop("lm_head.weight")
    if not cfg.tie_embeddings:
        out[name("OUTPUT")] = head

    def move(ours, theirs, i=None):  # a weight (and for gpt2 its bias) under its GGUF name
        weight = sd.pop(ours + ".weight")
        out[name(theirs, i)] = weight
        if arch == "gpt2":  # bias=False: the same function with a zero bias
            out[name(theirs, i, "bias")] = sd.pop(ours + ".bias", torch.zeros(weight.shape[0]))

    move("transformer.ln_f", "OUTPUT_NORM")
    if arch == "gpt2":  # the position table, padded with copies of its last row (gguf_positions)
        wpe = sd.pop("transformer.wpe.weight")
        out[name("POS_EMBD")] = torch.cat([wpe, wpe[-1:].expand(gguf_positions(cfg) - cfg.block_size, -1)])
        parts = {"ln_1": "ATTN_NORM", "attn.c_attn": "ATTN_QKV", "attn.c_proj": "ATTN_OUT", "ln_2": "FFN_NORM",
                 "mlp.c_fc": "FFN_UP", "mlp.c_proj": "FFN_DOWN"}
    else:
        parts = {"ln_1": "ATTN_NORM", "attn.c_proj": "ATTN_OUT", "ln_2": "FFN_NORM", "mlp.c_proj": "FFN_DOWN",
                 **({"attn.q_norm": "ATTN_Q_NORM", "attn.k_norm": "ATTN_K_NORM"} if cfg.qk_norm else {})}
    for i in range(cfg.n_layer):
        for ours, theirs in parts.items():
            move(f"transformer.h.{i}.{ours}", theirs, i)
        if arch != "gpt2":
            q, k, v = sd.pop(f"transformer.h.{i}.attn.c_attn.weight").chunk(3)
            if arch == "llama":
                q, k = interleave_rope(q, cfg.n_head), interleave_rope(k, cfg.n_head)
            gate, up = sd.pop(f"transformer.h.{i}.mlp.c_fc.weight").chunk(2)
            out.update({name("ATTN_Q", i): q, name("ATTN_K", i): k, name("ATTN_V", i): v,
                        name("FFN_GATE", i): gate, name("FFN_UP", i): up})
    assert not sd, f"weights without a GGUF name: {sorted(sd)}"  # a bug, not a user error
    return {k: v.contiguous() for k, v in out.items()}


def gguf_vocab(tok, n_rows):
    """llama.cpp's description of `tok` (tokenizer.Tokenizer) for a model of `n_rows` embedding rows: (tokens, token
    types, merges). The tokens and merges are those of the Hugging Face tokenizer.json that tokenizer_files writes
    (GPT-2's ranks converted by tiktoken_to_tokenizer_json, or a trained vocabulary's own file), in GPT-2's byte
    alphabet ("Ġthe"); llama.cpp's "gpt2" tokenizer model applies the merges in their order after splitting the
    text with GPT-2's pattern (tokenizer.ggml.pre "gpt-2"), which is what tiktoken and `tokenizers` do here.
    <|endoftext|> is a control token; the padding rows past the vocabulary are unused tokens "[PAD<id>]".
    Raises UserError for a tokenizer.json that does something else (a normalizer, another pre-tokenizer, ...)."""
    gguf = _needs_gguf()
    spec = tok.spec
    data = json.loads(tiktoken_to_tokenizer_json(spec) if spec["kind"] == "tiktoken" else spec["json"])
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or data.get("normalizer") or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True) or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("byte_fallback") or model.get("ignore_merges")):
        raise UserError(f"tokenizer {spec['name']} is not a plain byte-level BPE with GPT-2's pre-tokenizer (no "
                        f"normalizer, no prefix space), the only kind llama.cpp reproduces from a GGUF file")
    texts = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in data.get("added_tokens", []):
        texts[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    tokens, types = [], []
    for i in range(n_rows):
        if i < tok.vocab_size:
            tokens.append(texts[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def gguf_writer(model, tok, arch, dtype, name="tinystories"):
    """A gguf.GGUFWriter holding the whole GGUF file of `model` (our GPT) with tokenizer `tok` as llama.cpp
    architecture `arch` (gpt2, llama or qwen3), matrices in `dtype` (a GGUF_DTYPES key), ready for write_gguf.

    Metadata: the shape ({arch}.context_length = block_size, for gpt2 gguf_positions; embedding_length,
    block_count, feed_forward_length, attention.head_count and head_count_kv, vocab_size), model.NORM_EPS
    (layer_norm_epsilon for gpt2, layer_norm_rms_epsilon otherwise), model.ROPE_THETA and the head size as
    rope.freq_base and rope.dimension_count, the tokenizer (gguf_vocab) with <|endoftext|> as bos and eos and no
    token added to prompts (sample.py adds none), and sample.py's defaults (model.SAMPLING_DEFAULTS) as
    general.sampling.*, which llama.cpp's tools use unless told otherwise (min_p 0: sample.py has no such cut)."""
    gguf = _needs_gguf()
    file_type, qtype = GGUF_DTYPES[dtype]
    cfg = model.config
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(gguf_positions(cfg) if arch == "gpt2" else cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(4 * cfg.n_embd if arch == "gpt2" else swiglu_hidden(cfg.n_embd))
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(NORM_EPS)
    else:
        writer.add_layer_norm_rms_eps(NORM_EPS)
        writer.add_rope_freq_base(ROPE_THETA)
        writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.eot_token)
    writer.add_eos_token_id(tok.eot_token)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_float32("general.sampling.temp", SAMPLING_DEFAULTS["temperature"])  # by name: older gguf lacks them
    writer.add_float32("general.sampling.top_p", SAMPLING_DEFAULTS["top_p"])
    writer.add_int32("general.sampling.top_k", SAMPLING_DEFAULTS["top_k"])
    writer.add_float32("general.sampling.min_p", 0.0)
    for tensor_name, t in gguf_tensors(model, arch).items():
        data = t.numpy()
        keep_f32 = data.ndim < 2 or not tensor_name.endswith(".weight") or tensor_name.startswith("position_embd.")
        kind = gguf.GGMLQuantizationType.F32 if keep_f32 else getattr(gguf.GGMLQuantizationType, qtype)
        try:
            data = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # rows of a length Q8_0 cannot cut into blocks of 32
            kind = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, kind)
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    return writer


def gguf_bytes(writer):
    """About the size of the file that `writer` (gguf_writer) writes: its tensors plus its metadata."""
    tensors = sum(info.nbytes for shard in writer.tensors for info in shard.values())
    return tensors + sum(len(str(v.value)) for kv in writer.kv_data for v in kv.values())


def write_gguf(writer, path):
    """Write the file that `writer` (gguf_writer) holds to `path`. Raises OSError (e.g. a full disk)."""
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def ollama_modelfile(model_file, eot, block_size):
    """The text of an Ollama Modelfile for the GGUF file `model_file` (a name beside it): the prompt as it is (no
    chat template), stop at <|endoftext|> (`eot`, its text), sample.py's defaults (model.SAMPLING_DEFAULTS; top_k 0
    and repeat_penalty 1: no cut and no penalty), and a context of block_size tokens, the length trained on."""
    d = SAMPLING_DEFAULTS
    return (f"# ollama create tinystories -f Modelfile && ollama run tinystories \"Once upon a time\"\n"
            f"FROM ./{model_file}\n"
            f'TEMPLATE "{{{{ .Prompt }}}}"\n'
            f'PARAMETER stop "{eot}"\n'
            f"PARAMETER temperature {d['temperature']}\n"
            f"PARAMETER top_p {d['top_p']}\n"
            f"PARAMETER top_k {d['top_k']}\n"
            f"PARAMETER min_p 0\n"
            f"PARAMETER repeat_penalty 1\n"
            f"PARAMETER num_ctx {block_size}\n"
            f"PARAMETER num_predict {d['max_new_tokens']}\n")


MARKER = ".tinystories-export"  # written into every export folder: --force replaces only folders that hold it


def _check_destination(path, ckpt_path):
    """Raise UserError if `path` cannot be (re)written: a file; a non-empty folder without --force; with --force,
    a folder that export.py did not write (no MARKER file: a training run, the current directory, ...) or one that
    holds the checkpoint itself. Paths are compared after resolving symbolic links."""
    if os.path.isfile(path):
        raise UserError(f"export_dir {path} is a file: choose a folder name")
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            raise UserError(f"export_dir {path} already exists and is not empty: pass --force to replace it, "
                            f"or choose another --export_dir")
        real = os.path.realpath(path)
        if os.path.commonpath([real, os.path.realpath(ckpt_path)]) == real:
            raise UserError(f"export_dir {path} holds the checkpoint {ckpt_path}: --force would delete it; "
                            f"choose another --export_dir")
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise UserError(f"export_dir {path} was not written by export.py (it has no {MARKER} file), so --force "
                            f"will not delete it: choose another --export_dir")


_held = []  # open, locked folders of this process (flock lasts while the descriptor is open)


def _hold(folder):
    """Lock the folder this export created (flock on a descriptor kept open until the process ends), so that
    another export's clean_leftovers knows it is in use. Where the OS has no flock (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)


def clean_leftovers(dest):
    """Remove the temporary folders (.NAME.tmp.*, .NAME.old.*) that killed exports to `dest` left beside it: those
    no running export holds (_hold). A .NAME.old.* folder holds the previous export, moved aside just before the
    new one was renamed into place: if `dest` is missing, the previous export is put back there instead of being
    deleted. Returns the list of names removed or restored, for a message. Nothing happens where the OS has no
    flock (Windows): a running export's folders cannot be told from leftovers there."""
    try:
        import fcntl
    except ImportError:
        return []
    parent, base = os.path.dirname(os.path.abspath(dest)), os.path.basename(os.path.abspath(dest))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    done = []
    for name in sorted(entries):
        path = os.path.join(parent, name)
        if not name.startswith((f".{base}.tmp.", f".{base}.old.")) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: an export running now
            os.close(fd)
            continue
        try:
            previous = os.path.join(path, "dir")
            if ".old." in name and os.path.isdir(previous) and not os.path.lexists(dest):
                os.replace(previous, dest)
                note = f"{name} (the previous export, put back at {dest})"
            else:
                note = name
            shutil.rmtree(path)
            done.append(note)
        except OSError:
            pass  # not ours to remove (permissions): left as it is
        finally:
            os.close(fd)
    return done


def _replace_dir(tmp, path):
    """Put the finished folder `tmp` at `path`: a rename when `path` is missing or empty; otherwise the old folder
    is renamed aside first and deleted after the new one is in place."""
    old = None
    if os.path.isdir(path) and os.listdir(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(os.path.abspath(path)))
        _hold(old)
        os.replace(path, os.path.join(old, "dir"))
    try:
        os.replace(tmp, path)  # replaces an empty folder in one step
    except OSError:
        if old is not None:
            os.replace(os.path.join(old, "dir"), path)
            os.rmdir(old)
        raise
    if old is not None:
        shutil.rmtree(old)


def main():
    configure(globals(), doc=__doc__)
    if format not in ("hf", "gguf"):
        raise UserError(f"--format={format!r} is not one of 'hf' (a Hugging Face transformers folder) and 'gguf' "
                        f"(a GGUF file for llama.cpp, Ollama and LM Studio)")
    if format == "gguf" and gguf_dtype not in GGUF_DTYPES:
        raise UserError(f"--gguf_dtype={gguf_dtype!r} is not one of {', '.join(map(repr, GGUF_DTYPES))}")
    if format == "gguf":
        _needs_gguf()
    else:
        try:
            from safetensors.torch import save_file
        except ImportError:  # optional: only export.py writes safetensors (requirements-dev.txt has it)
            raise UserError("export.py needs safetensors: pip install safetensors") from None
    ckpt_path = os.path.join(out_dir, checkpoint)
    dest = os.path.normpath(export_dir)
    cleaned = clean_leftovers(dest)
    if cleaned:
        print(f"removed what killed exports left: {', '.join(cleaned)}")
    _check_destination(dest, ckpt_path)
    model, tok, _ = load_model(ckpt_path)
    args = asdict(model.config)  # every GPTConfig field, also for a checkpoint older than a switch
    if tok.vocab_size > args["vocab_size"]:
        raise UserError(f"{ckpt_path} is inconsistent: its tokenizer has {tok.vocab_size} ids but the model only "
                        f"{args['vocab_size']} embedding rows")

    arch = architecture(args, "llama.cpp" if format == "gguf" else "transformers")
    if format == "gguf":  # model.gguf and an Ollama Modelfile
        arch = GGUF_ARCHITECTURES[arch]
        writer = gguf_writer(model, tok, arch, gguf_dtype)
        weights_name, weights_size = "model.gguf", gguf_bytes(writer)
        files = {"Modelfile": ollama_modelfile(weights_name, EOT, args["block_size"])}

        def write_weights(path):
            write_gguf(writer, path)
    else:
        if arch == "GPT2LMHeadModel":
            config, state = gpt2_config(args, tok.eot_token), gpt2_state_dict(model)
        else:
            config, state = llama_config(args, tok.eot_token, arch), llama_state_dict(model)
        files = tokenizer_files(tok, args["block_size"])
        files["config.json"] = json.dumps(config, indent=2) + "\n"
        files["generation_config.json"] = json.dumps(
            generation_config(tok.eot_token, tok.vocab_size, args["vocab_size"]), indent=2) + "\n"
        weights_name = "model.safetensors"
        weights_size = sum(t.numel() * t.element_size() for t in state.values())

        def write_weights(path):
            try:
                save_file(state, path, metadata={"format": "pt"})
            except OSError:
                raise
            except Exception as e:  # safetensors' own error type wraps the OS error (a full disk, ...)
                raise OSError(str(e).splitlines()[0]) from None
    parent = os.path.dirname(os.path.abspath(dest))
    need = weights_size + sum(len(t.encode()) for t in files.values())
    try:
        os.makedirs(parent, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if need > free:
            raise UserError(f"the export needs about {need / 1e6:,.1f} MB but only {free / 1e6:,.1f} MB are free "
                            f"in {parent}: free some space or choose another --export_dir (nothing was written)")
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp.", dir=parent)
        _hold(tmp)
    except OSError as e:
        raise UserError(f"cannot write in {parent} ({e.strerror or e}): choose an --export_dir in a folder you "
                        f"can write to") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        weights = os.path.join(tmp, weights_name)
        write_weights(weights)
        for name, text in {**files, MARKER: json.dumps({"checkpoint": ckpt_path}) + "\n"}.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:  # tmp is new and ours alone (mkdtemp)
                f.write(text)
        os.chmod(weights, 0o666 & ~umask)  # mkdtemp and safetensors create owner-only; make it like the rest
        os.chmod(tmp, 0o777 & ~umask)
        _replace_dir(tmp, dest)
    except OSError as e:
        raise UserError(f"could not write {dest}: {e.strerror or e}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    print(f"exported {ckpt_path} as {arch} ({model.num_params() / 1e6:.2f}M parameters, tokenizer {tok.spec['name']}"
          f"{f', {gguf_dtype}' if format == 'gguf' else ''}) to {dest}/: {', '.join(sorted([weights_name, *files]))}")
    if format == "gguf":
        print(f'run it with llama.cpp: llama-completion -m {os.path.join(dest, weights_name)} -no-cnv '
              f'-p "Once upon a time" -n 200; or with Ollama: ollama create tinystories -f '
              f'{os.path.join(dest, "Modelfile")} && ollama run tinystories')
    else:
        print(f'load it with transformers.AutoModelForCausalLM.from_pretrained("{dest}") and '
              f'AutoTokenizer.from_pretrained("{dest}")')


if __name__ == "__main__":
    run(main)
