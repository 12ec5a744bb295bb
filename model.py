"""A GPT-2-style decoder-only transformer written on PyTorch primitives: the network, its KV cache for
generation, and sampling. This is the reference: the math, on PyTorch's own operations. fast.py turns it into one
with the same weights that runs faster or in less memory (train.py calls it in one line); optim.py holds the
optimizers.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; the transformer of
Vaswani et al. 2017 with LayerNorm moved before each sub-block):

    tokens (B, T) -> token embedding + learned position embedding -> dropout
                  -> n_layer x [x + Attention(LayerNorm(x)); x + MLP(LayerNorm(x))]
                  -> LayerNorm -> linear head tied to the token embedding -> logits (B, T, vocab_size)

GPTConfig's switches swap single parts for their modern replacements (docs/recipe.md): rotary positions instead
of the learned table, RMSNorm, a SwiGLU or squared-ReLU MLP, RMSNorm on queries and keys, an untied head.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from errors import UserError


@dataclass
class GPTConfig:
    """Shape of a GPT. `vocab_size` is the embedding rows (may be padded past the tokenizer's vocabulary),
    `block_size` the longest context in tokens, `n_embd` the residual width, split into `n_head` heads."""
    vocab_size: int = 50304
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True             # biases in Linear layers and LayerNorms
    pos_embedding: str = "learned"  # "learned" table (GPT-2) or "rope" (rotary, Su et al. 2021)
    norm: str = "layernorm"       # "layernorm" (Ba et al. 2016) or "rmsnorm" (Zhang & Sennrich 2019)
    mlp: str = "gelu"             # "gelu" (GPT-2), "swiglu" (Shazeer 2020) or "relu2" (So et al. 2021)
    qk_norm: bool = False         # RMSNorm on each head's queries and keys (Henry et al. 2020; Qwen3)
    tie_embeddings: bool = True   # the head reuses the token embedding (Press & Wolf 2017)

    def __post_init__(self):
        for f in fields(self):  # a checkpoint from elsewhere may hold anything
            value = getattr(self, f.name)
            if not (type(value) is f.type or (f.type is float and type(value) is int)):
                raise UserError(f"{f.name} must be {f.type.__name__}, got {type(value).__name__} {value!r}")
        for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be a positive integer, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            f"each head gets n_embd/n_head channels, so choose n_head among the divisors of n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for k, allowed in SWITCHES.items():
            if getattr(self, k) not in allowed:
                raise UserError(f"{k}={getattr(self, k)!r} is not one of {', '.join(map(repr, allowed))}")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"pos_embedding='rope' rotates pairs of channels, so the head size n_embd/n_head must be "
                            f"even; got {self.n_embd}/{self.n_head} = {self.n_embd // self.n_head}: change n_head")


SWITCHES = {"pos_embedding": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "swiglu", "relu2")}  # the text switches; qk_norm and tie_embeddings are bools
RECIPE = (*SWITCHES, "qk_norm", "tie_embeddings")  # every switch of the recipe
ROPE_THETA = 10000.0  # the base of the rotary frequencies (Su et al. 2021; Llama's default)
NORM_EPS = 1e-5       # epsilon of every LayerNorm and RMSNorm (nn.LayerNorm's default; Llama's rms_norm_eps)


def make_norm(config, dim):
    """The normalisation layer of `config` over the last `dim` channels: LayerNorm (subtract the mean, divide by
    the standard deviation, then gain and optional bias) or RMSNorm (divide by the root mean square, then gain;
    Zhang & Sennrich 2019), which skips the mean and the bias and works as well in transformers."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=config.bias)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same state dict), (..., dim) -> same shape, in the input's dtype: the gain is cast to it, so bfloat16
    queries and keys under autocast take PyTorch's fused kernel (a float32 gain warns "Mismatch dtype" and falls
    back)."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim, n_positions, theta=ROPE_THETA):
    """Rotary position embedding angles (Su et al. 2021, "RoFormer"): channel pair i of a head at position t
    is rotated by t * theta^(-2i/head_dim). Returns (cos, sin), each (n_positions, head_dim // 2) float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate queries or keys x (B, T, n_head, head_dim) by the angles of their positions, cos and sin
    (T, 1, head_dim // 2). Channel i is paired with channel i + head_dim/2 (the "rotate half" layout of Llama and
    Hugging Face transformers, so an exported model needs no permutation). The dot product of a rotated query
    and key then depends on their distance only, not on their absolute positions. In x's dtype, as transformers."""
    x1, x2, cos, sin = *x.chunk(2, dim=-1), cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def padded_vocab_size(n, multiple=64):
    """Embedding rows for a tokenizer of n ids: n rounded up to a multiple of 64, which makes the head's matmul
    faster on GPUs (tensor-core tiles). The extra ids never occur in the data and are never sampled."""
    return math.ceil(n / multiple) * multiple


class KVCache:
    """Keys and values of every layer for positions already seen, so generation feeds one new token per step.
    Preallocated on first use in the dtype and device of the keys (bf16 under autocast): k and v are
    (n_layer, B, n_head, block_size, head_dim); `pos` counts the filled positions."""

    def __init__(self, config):
        self.n_layer, self.block_size = config.n_layer, config.block_size
        self.k, self.v, self.pos = None, None, 0

    @staticmethod
    def bytes_needed(config, batch, itemsize):
        """Bytes that generating `batch` rows at once takes beyond the weights: the cache's k and v
        (2 x n_layer x batch x block_size x n_embd values of `itemsize` bytes) and the sampler's float32 logits,
        sorted logits and probabilities (about 6 x batch x vocab_size x 4 bytes)."""
        cache = 2 * config.n_layer * batch * config.block_size * config.n_embd * itemsize
        return cache + 24 * batch * config.vocab_size

    def update(self, layer, k, v):
        """Store k, v of shape (B, n_head, T, head_dim) at the next T positions of `layer`; return the keys
        and values of all positions so far, (B, n_head, pos + T, head_dim). GPT.forward advances `pos`."""
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_zeros(self.n_layer, B, H, self.block_size, D)
            self.v = v.new_zeros(self.n_layer, B, H, self.block_size, D)
        t = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only, (B, T, n_embd) in and out."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        if config.qk_norm:  # bounds the attention logits, which lets higher learning rates train stably
            self.q_norm = RMSNorm(config.n_embd // config.n_head, eps=NORM_EPS)
            self.k_norm = RMSNorm(config.n_embd // config.n_head, eps=NORM_EPS)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout_p = config.dropout  # on the attention weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0, rope=None):
        """x (B, T, n_embd); rope: (cos, sin) of the T positions, (T, 1, head_dim // 2) (see apply_rope), or None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        if cache is not None and T > 1 and cache.pos > 0:
            raise ValueError("a cache holding positions can only be extended one token at a time")
        q, k = self.queries_keys(q, k, rope)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # With a cache, one query row looks at every cached key: no mask is needed. A first pass over a
        # prompt (cache empty) is the ordinary causal case.
        causal = cache is None or cache.pos == 0
        y = self.attend(q, k, v, causal).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def queries_keys(self, q, k, rope):
        """QK-norm (if configured), then rotary positions (if rope is given), per head, on q and k of shape
        (B, T, n_head, head_dim): the contiguous layout, where both are cheaper than on the transpose. Returns
        q, k as (B, n_head, T, head_dim), the layout attention wants."""
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2)

    def attend(self, q, k, v, causal):
        """softmax(q k^T / sqrt(head_dim), masked if causal) v (Vaswani et al. 2017), with dropout on the attention
        weights in training: q (B, n_head, T, head_dim), k and v (B, n_head, T', head_dim) -> like q (causal needs
        T' = T). F.scaled_dot_product_attention picks a fused kernel (FlashAttention on recent GPUs, Dao et al.
        2022) when it can."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                              dropout_p=self.dropout_p if self.training else 0.0)


def swiglu_hidden(n_embd):
    """SwiGLU's hidden width: its three matrices hold 3 x n_embd x hidden weights, so hidden = 8/3 n_embd matches
    the 2 x n_embd x 4 n_embd of GPT-2's MLP; rounded to a multiple of 8 (e.g. 128 -> 344, 384 -> 1024)."""
    return 8 * round(n_embd / 3)


class MLP(nn.Module):
    """Position-wise feed-forward, (B, T, n_embd) -> (B, T, n_embd), one of (config.mlp):
    "gelu": Linear(n_embd -> 4 n_embd), exact GELU (Hendrycks & Gimpel 2016), Linear back (GPT-2).
    "relu2": the same with ReLU(x)^2 (So et al. 2021, "Primer"): sparse and cheap, and it trains faster.
    "swiglu": silu(x W_gate) * (x W_up), then Linear back (Shazeer 2020, "GLU Variants Improve Transformer");
    gate and up are one matmul, c_fc, whose first half of rows is the gate."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = swiglu_hidden(config.n_embd) if self.kind == "swiglu" else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). (B, T, n_embd) in and out."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The language model. `forward(idx)` maps token ids (B, T) to next-token logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        learned = config.pos_embedding == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        if not learned:  # the angles of every position, recomputed rather than saved (non-persistent buffers)
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017): the head reuses the input embedding matrix
            self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        # An untied head starts at zero (as in the modded-nanogpt speedrun): every token starts equally likely.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Number of parameters (a tied head counted once). With non_embedding, without the token and (learned)
        position embeddings; an untied head is counted."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for k, e in self.transformer.items() if k in ("wte", "wpe"))
        return n

    def forward(self, idx, targets=None, cache=None, loss_weights=None):
        """Next-token logits and, given targets, the mean cross-entropy.

        Args:
            idx: token ids, (B, T) int64, T <= block_size (or T + cache.pos <= block_size).
            targets: the ids that should follow each position, (B, T) int64; -1 marks positions to ignore.
            cache: a KVCache; positions continue from cache.pos, and cache.pos advances by T.
            loss_weights: None, or (B, T) float: each position's weight in the mean loss, which is then
                sum(w * nll) / sum(w) (train.py weighs the words an instruction asked for: docs/instruct.md).
        Returns:
            (logits, loss): with targets, logits (B, T, vocab_size) and the loss, a scalar in nats per token (see
            `logits_and_loss`); without targets, logits (B, 1, vocab_size) for the last position only and loss None.
        Raises:
            ValueError: the sequence is longer than block_size.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        else:  # rotary: positions enter each attention layer's queries and keys instead of the residual stream
            rope = (self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        return self.logits_and_loss(x, targets, loss_weights)

    def logits_and_loss(self, x, targets, loss_weights=None):
        """The head and the cross-entropy of every position: x (B, T, n_embd) final hidden states, targets (B, T)
        int64 (-1: ignored), loss_weights None or (B, T) float. Returns (logits (B, T, vocab_size), loss): the mean
        negative log-likelihood of the targets in nats per token, or with weights sum(w * nll) / sum(w) over the
        positions that count (NaN when none does, as F.cross_entropy gives)."""
        logits = self.lm_head(x)
        flat_logits, flat_targets = logits.float().view(-1, logits.size(-1)), targets.view(-1)
        if loss_weights is None:
            return logits, F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
        nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="none")  # 0 where ignored
        weights = loss_weights.reshape(-1).float() * (flat_targets != -1)
        return logits, (nll * weights).sum() / weights.sum()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_token=None,
                 vocab_limit=None, use_cache=True, generator=None, keep=0):
        """Continue each row of `idx` (B, T) by sampling: generate_stream's tokens collected (same arguments).
        Returns (B, T + n) int64 with n <= max_new_tokens (fewer when every row ended with eos_token).
        Raises UserError (a ValueError): see check_sampling. Call model.eval() first."""
        steps = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token, vocab_limit,
                                          use_cache, generator, keep))
        return torch.cat([idx, torch.stack(steps, dim=1)], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_token=None,
                        vocab_limit=None, use_cache=True, generator=None, keep=0):
        """Sample a continuation of each row of `idx` one token at a time, yielding each step's tokens as soon as
        they are drawn (for printing stories while they are written; `generate` collects them).

        Args:
            idx: prompt token ids, (B, T) int64, T >= 1.
            max_new_tokens: tokens to add per row.
            temperature: divides the logits; 0 means greedy (always the most likely token).
            top_k: sample among the k most likely tokens only (0: no limit) (Fan et al. 2018).
            top_p: sample from the smallest set of tokens whose probabilities sum to >= top_p (nucleus
                sampling, Holtzman et al. 2020); 1.0 turns it off.
            eos_token: once a row produces it, that row only repeats it; stops early when every row has.
            vocab_limit: ids >= vocab_limit (embedding padding) are never produced.
            use_cache: keep keys and values of past positions (KVCache) so each step runs one position; without
                it, each step re-runs the whole context (the same result).
            generator: torch.Generator for reproducible sampling.
            keep: the first `keep` tokens of idx (an instruction header, docs/instruct.md) stay at the start of
                every window, as they do in training; ignored unless keep < block_size // 2.
        Yields:
            (B,) int64 on idx's device: the next token of every row, at most max_new_tokens times.
        Raises:
            UserError (a ValueError), at the first step: see check_sampling.

        Contexts longer than block_size: when the window is full, generation continues from its last
        block_size // 2 tokens (the first `keep` tokens, then the latest ones; the cache is rebuilt from them with
        one forward pass), so a cached step stays cheap. Both modes use the same windows, so greedy output is
        identical with and without cache.
        """
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        block = self.config.block_size
        keep = keep if 0 < keep < block // 2 else 0
        tail = max(keep, idx.size(1) - (block - keep))  # the window: idx[:, :keep], then idx[:, tail:]
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if keep + idx.size(1) - tail > block:
                tail, cache = idx.size(1) - (block // 2 - keep), None
            if not use_cache:
                logits, _ = self(torch.cat([idx[:, :keep], idx[:, tail:]], dim=1))
            elif cache is None:
                cache = KVCache(self.config)
                logits, _ = self(torch.cat([idx[:, :keep], idx[:, tail:]], dim=1), cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, vocab_limit, generator)
            if eos_token is not None:
                next_id = next_id.masked_fill(done, eos_token)
                done |= next_id == eos_token
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            yield next_id
            if eos_token is not None and bool(done.all()):
                break


# sample.py's, eval.py's and serve.py's: a little sharper than the model (0.8), without its least likely 5%
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "max_new_tokens": 256}
MAX_NEW_TOKENS = 100_000  # a story is a few hundred tokens; far more is a typo, not a wish
MAX_TEMPERATURE = 100.0  # already at 10 nearly every token is as likely as any other; far above, logits overflow


def check_sampling(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=1):
    """The one check of the sampling settings that sample.py, eval.py and generation share (see GPT.generate).
    Raises UserError (a ValueError) unless temperature >= 0, top_k >= 0, 0 < top_p <= 1 and
    1 <= max_new_tokens <= MAX_NEW_TOKENS, and temperature <= MAX_TEMPERATURE."""
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1):  # "not >=" also catches NaN
        raise UserError(f"temperature and top_k must be >= 0 and top_p in (0, 1]; got temperature={temperature}, "
                        f"top_k={top_k}, top_p={top_p}")
    if temperature > MAX_TEMPERATURE:
        raise UserError(f"temperature={temperature:g} is beyond reason: at 10 nearly every token is already as likely "
                        f"as any other; use at most {MAX_TEMPERATURE:g}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise UserError(f"max_new_tokens={max_new_tokens:,} is beyond reason: a story is a few hundred tokens; "
                        f"use at most {MAX_NEW_TOKENS:,}")


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, vocab_limit=None, generator=None):
    """Draw one token id per row from logits (B, V) -> (B,) int64. See GPT.generate_stream for the arguments,
    which the caller checks once (check_sampling), not at every token. A temperature too small for the scaled
    logits to be finite samples greedily (its limit), as temperature 0 does."""
    logits = logits.float().nan_to_num(nan=-float("inf"))  # an overflowed (float16) logit: never drawn
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_limit:] = -float("inf")
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or below what float32 holds (1e-300 would become 0)
        return logits.argmax(dim=-1)  # greedy: the limit of sampling as the temperature goes to 0
    # Shifted so that each row's largest logit is 0 (softmax does not change under a shift): no temperature, however
    # small, then overflows to inf; a tiny one leaves the largest at 0 and the rest at -inf, again greedy.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -float("inf")).scatter(1, indices, values)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely token always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]

