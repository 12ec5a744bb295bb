"""A GPT-2-style decoder-only transformer, written on PyTorch primitives, and everything around it that the
scripts share: the tokenizer, device and precision choice, and checkpoint files.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; the transformer of
Vaswani et al. 2017 with LayerNorm moved before each sub-block):

    tokens (B, T) -> token embedding + learned position embedding -> dropout
                  -> n_layer x [x + Attention(LayerNorm(x)); x + MLP(LayerNorm(x))]
                  -> LayerNorm -> linear head tied to the token embedding -> logits (B, T, vocab_size)
"""

import base64
import contextlib
import hashlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError


# --------------------------------------------------------------------------------------------------------------
# The model

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
    bias: bool = True

    def __post_init__(self):
        for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be a positive integer, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            f"each head gets n_embd/n_head channels, so choose n_head among the divisors of n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of every layer for positions already seen, so generation feeds one new token per step.

    Preallocated on first use in the dtype and device of the keys (bf16 under autocast): k and v are
    (n_layer, B, n_head, block_size, head_dim); `pos` counts the filled positions.
    """

    def __init__(self, config):
        self.n_layer, self.block_size = config.n_layer, config.block_size
        self.k = self.v = None
        self.pos = 0

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
    """Multi-head self-attention in which position t attends to positions <= t only.

    Input and output (B, T, n_embd). Uses `F.scaled_dot_product_attention`, which picks a fused kernel
    (FlashAttention on recent GPUs, Dao et al. 2022) when it can.
    """

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # With a cache, one query row looks at every cached key: no mask is needed. A first pass over a
        # prompt (cache empty) is the ordinary causal case.
        causal = cache is None or cache.pos == 0
        if cache is not None and T > 1 and cache.pos > 0:
            raise ValueError("a cache holding positions can only be extended one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(n_embd -> 4 n_embd), exact GELU (Hendrycks & Gimpel 2016), Linear back.
    (B, T, n_embd) -> (B, T, n_embd)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). (B, T, n_embd) in and out."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


HEAD_CHUNK_LOGITS = 2 ** 25  # at most this many logits per chunk of ChunkedHeadLoss: 128 MiB in float32


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of a linear head, computed a chunk of positions at a time (at most
    HEAD_CHUNK_LOGITS // vocab_size of them), so that the logits of all positions (N x vocab_size floats, and as
    many for their gradient) never exist at once.

    For z = x W^T (one row of vocab_size logits per position), the loss is the mean over positions n with
    targets[n] != -1 of logsumexp(z[n]) - z[n, targets[n]], and its gradient with respect to z[n] is
    (softmax(z[n]) - onehot(targets[n])) / count: the standard softmax cross-entropy gradient. A chunk's rows
    hold the whole vocabulary, so forward can form that gradient as soon as it has the chunk's logits, and turns
    it at once into the chunk's share of dL/dx and dL/dW (as in Liger Kernel's fused linear cross-entropy,
    Hsu et al. 2024). Backward only multiplies them by the incoming gradient: no logits are recomputed, and the
    head costs the same 6 N n_embd vocab_size FLOPs as the plain path. What is kept from forward to backward is
    dL/dx (N x n_embd) and dL/dW (vocab_size x n_embd, float32), which the weight's .grad needs anyway.

    Logits and the matmuls of the gradient run in `dtype` (the autocast precision, as nn.Linear under autocast);
    log-softmax, softmax and the dL/dW sum over chunks in float32 (or float64 for float64 inputs). On a CPU
    (2 cores, see README, Performance) the head with its loss takes about 20% longer than the plain path at
    HEAD_CHUNK_LOGITS = 2**25 (smaller matmuls, and the sum of dL/dW over chunks); smaller chunks save
    memory and cost more time.

    apply(x, weight, targets, dtype, need_grad):
        x: (N, n_embd) hidden states; weight: (vocab_size, n_embd), the head (tied: the token embedding);
        targets: (N,) int64, -1 for positions that do not count; need_grad: form the gradients (False under
        torch.no_grad, see head_loss). Returns the loss, a scalar in nats per token (float32; float64 for
        float64 inputs): NaN when every target is -1, as F.cross_entropy gives. A target >= vocab_size raises
        RuntimeError (index out of bounds), as there.
        Backward runs once: the saved gradients are consumed (retain_graph cannot reuse them).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, need_grad):
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
        w = weight.to(dtype)
        valid = targets != -1
        count = valid.sum()
        scale = valid.to(acc) / count.clamp(min=1)  # d(loss)/d(nll of each position)
        nll = torch.empty(x.size(0), dtype=acc, device=x.device)
        ctx.grads = None
        if need_grad:
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        n_chunks = -(-x.size(0) * weight.size(0) // HEAD_CHUNK_LOGITS)  # ceil
        chunk = -(-x.size(0) // n_chunks)  # positions per chunk, as even as can be
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
            for start in range(0, x.size(0), chunk):
                end = min(start + chunk, x.size(0))
                xc, t = x[start:end].to(dtype), targets[start:end].clamp(min=0)[:, None]
                # this chunk's (n, vocab_size) log-probabilities in float32, straight from the logits in dtype
                logp = torch.log_softmax(xc @ w.t(), dim=1, dtype=acc)
                nll[start:end] = -logp.gather(1, t).squeeze(1)
                if not need_grad:
                    continue
                p = logp.exp_()  # softmax, in place; then minus the one-hot target
                p.scatter_add_(1, t, -valid[start:end, None].to(acc))
                g = p.to(dtype)
                del logp, p
                # each row of g times its position's weight in the mean (0 for ignored targets), applied to the
                # small (n, n_embd) factors rather than to g
                row_scale = scale[start:end, None]
                grad_x[start:end] = (g @ w) * row_scale
                grad_w += g.t() @ (xc * row_scale).to(dtype)
        if need_grad:
            ctx.grads = grad_x, grad_w.to(weight.dtype)
        return torch.where(valid, nll, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("backward through ChunkedHeadLoss can run only once (its gradients are consumed)")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None


def head_loss(x, weight, targets):
    """The mean cross-entropy of logits x W^T against targets without the full logits (ChunkedHeadLoss), in the
    autocast precision when autocast is on for x's device. x: (N, n_embd); weight: (vocab_size, n_embd);
    targets: (N,) int64, -1 ignored. Returns a scalar in nats per token: float32 (float64 for float64 x)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedHeadLoss.apply(x, weight, targets, dtype, need_grad)


class GPT(nn.Module):
    """The language model. `forward(idx)` maps token ids (B, T) to next-token logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer reuses the input embedding matrix.
        self.lm_head.weight = self.transformer.wte.weight

        # GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Number of parameters (the tied head counted once). With non_embedding, without both embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, full_logits=False):
        """Next-token logits and, given targets, the mean cross-entropy.

        Args:
            idx: token ids, (B, T) int64, T <= block_size (or T + cache.pos <= block_size).
            targets: the ids that should follow each position, (B, T) int64; -1 marks positions to ignore.
            cache: a KVCache; positions continue from cache.pos, and cache.pos advances by T.
            full_logits: with targets, also return the logits of every position and take the loss from them
                (the plain path). By default the loss comes from ChunkedHeadLoss, which never holds the
                (B, T, vocab_size) logits, and the logits returned are None.
        Returns:
            (logits, loss): with targets, loss a scalar in nats per token and logits None, or (B, T, vocab_size)
            with full_logits (or a head that is not an nn.Linear, such as quantize_int8's); without targets,
            logits (B, 1, vocab_size) for the last position only and loss None.
        Raises:
            ValueError: the sequence is longer than block_size.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if full_logits or not isinstance(self.lm_head, nn.Linear):  # the plain path (also int8's quantized head)
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return None, head_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1))

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on the matmul and embedding weights
        (every parameter with 2 or more dimensions) and none on biases and LayerNorm gains.
        Uses the fused kernel where this PyTorch has one for the device, else the multi-tensor (foreach) one."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu", "mps")
        kw = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **kw)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_token=None,
                 vocab_limit=None, use_cache=True, generator=None):
        """Continue each row of `idx` by sampling one token at a time.

        Args:
            idx: prompt token ids, (B, T) int64, T >= 1.
            max_new_tokens: tokens to add per row.
            temperature: divides the logits; 0 means greedy (always the most likely token).
            top_k: sample among the k most likely tokens only (0: no limit) (Fan et al. 2018).
            top_p: sample from the smallest set of tokens whose probabilities sum to >= top_p (nucleus
                sampling, Holtzman et al. 2020); 1.0 turns it off.
            eos_token: once a row produces it, that row only repeats it; stops early when every row has.
            vocab_limit: ids >= vocab_limit (embedding padding) are never produced.
            use_cache: keep keys and values of past positions (KVCache) so each step runs one position.
                Without it, each step re-runs the whole context; the result is the same.
            generator: torch.Generator for reproducible sampling.
        Returns:
            (B, T + n) int64 with n <= max_new_tokens (fewer when every row ended with eos_token).
        Raises:
            ValueError: temperature < 0, top_k < 0 or top_p outside (0, 1].
        Call model.eval() first: in training mode dropout stays on.

        Contexts longer than block_size: when the window is full, generation continues from its last
        block_size // 2 tokens (the cache is rebuilt from them with one forward pass), so a cached step
        stays cheap. Both modes use the same windows, so greedy output is identical with and without cache.
        """
        block = self.config.block_size
        start = max(0, idx.size(1) - block)  # first token of the current window
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:
                start, cache = idx.size(1) - block // 2, None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:
                cache = KVCache(self.config)
                logits, _ = self(idx[:, start:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, vocab_limit, generator)
            if eos_token is not None:
                next_id = next_id.masked_fill(done, eos_token)
                done |= next_id == eos_token
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if eos_token is not None and bool(done.all()):
                break
        return idx


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, vocab_limit=None, generator=None):
    """Draw one token id per row from logits (B, V) -> (B,) int64. See GPT.generate for the arguments.
    Raises ValueError for temperature < 0, top_k < 0 or top_p outside (0, 1]."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_limit:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
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
    # Inverse-CDF sampling: one uniform number per row and a binary search in the cumulative probabilities.
    # torch.multinomial draws one exponential per vocabulary entry instead: 50k random numbers per token, a
    # seventh of the time of a whole cached step on CPU. Float64 keeps the tail of the distribution exact.
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, dtype=torch.float64, device=cdf.device, generator=generator)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]  # first id whose cdf exceeds u: p(id) > 0
    last = (cdf >= cdf[:, -1:]).int().argmax(dim=-1)  # the cdf reaches its total at the last id with p > 0
    return torch.minimum(ids, last)  # only if rounding put u * total at total


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: text <-> token ids, described by a plain dict so that it travels inside meta.json and checkpoints

EOT = "<|endoftext|>"


class Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016, on bytes as in GPT-2): text <-> token ids.

    Built from a `spec` dict that holds everything needed to rebuild it, so a checkpoint that stores the spec
    decodes without the data directory. Two kinds:
        {"kind": "tiktoken", "name", "source": "gpt2" or the ranks file, "pat_str",
         "ranks": the mergeable ranks in .tiktoken format ("base64(token bytes) rank" per line), "sha256"}
            GPT-2's vocabulary through tiktoken; <|endoftext|> is the id after the last rank.
        {"kind": "bpe", "name", "source": "tokenizer.json" (in the data directory), "json": that file's text,
         "sha256"}
            a vocabulary trained on the corpus by prepare.py with Hugging Face `tokenizers`.
    "sha256" is the fingerprint of the vocabulary (of "ranks" or "json"). `eot_token` (<|endoftext|>) ends
    every document. Text is encoded without special tokens: a story containing the string "<|endoftext|>"
    gets ordinary tokens for it, and decode(encode(s)) == s for any str s.
    Raises UserError for a spec of unknown kind.
    """

    def __init__(self, spec):
        self.spec = spec
        if spec["kind"] == "tiktoken":
            import tiktoken
            ranks = {}
            for line in spec["ranks"].splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            self.eot_token = len(ranks)
            enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                    special_tokens={EOT: self.eot_token})
            self.vocab_size = enc.n_vocab
            self._encode_batch = enc.encode_ordinary_batch
            self._decode = enc.decode
        elif spec["kind"] == "bpe":
            from tokenizers import Tokenizer as HFTokenizer
            hf = HFTokenizer.from_str(spec["json"])
            hf.encode_special_tokens = True  # "<|endoftext|>" typed in a story is text, not the separator
            self.eot_token = hf.token_to_id(EOT)
            self.vocab_size = hf.get_vocab_size()
            self._encode_batch = lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
            self._decode = lambda ids: hf.decode(ids, skip_special_tokens=False)
        else:
            raise UserError(f"unknown tokenizer kind {spec['kind']!r} (expected tiktoken or bpe)")

    def __getstate__(self):  # pickled as its spec (datasets.map sends it to worker processes)
        return self.spec

    def __setstate__(self, spec):
        self.__init__(spec)

    def encode(self, text):
        """str -> list of token ids (int), without end-of-text."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts):
        """list of str -> list of lists of token ids, encoded in parallel by the library's threads."""
        return self._encode_batch(list(texts))

    def decode(self, ids):
        """Token ids -> str. Ids that end inside a multi-byte character decode to U+FFFD."""
        return self._decode(list(ids))

    def describe(self):
        """The spec without its bulky content, for meta.json and logs."""
        return {k: v for k, v in self.spec.items() if k not in ("ranks", "json")}


def bpe_spec(json_text, source):
    """Spec of a Hugging Face tokenizer.json (see Tokenizer). Raises UserError if it has no <|endoftext|>."""
    from tokenizers import Tokenizer as HFTokenizer
    try:
        hf = HFTokenizer.from_str(json_text)
    except Exception as e:
        raise UserError(f"{source} is not a tokenizer.json file ({type(e).__name__}: {e})") from None
    if hf.token_to_id(EOT) is None:
        raise UserError(f"{source} has no {EOT} token; prepare.py needs it to separate documents")
    return {"kind": "bpe", "name": f"bpe-{hf.get_vocab_size()}", "source": source, "json": json_text,
            "sha256": hashlib.sha256(json_text.encode()).hexdigest()}


def _tiktoken_spec(name, source, ranks):
    from tiktoken_ext.openai_public import r50k_pat_str
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{source}: token ranks are not 0..{len(ranks) - 1}; is this a .tiktoken ranks file?")
    return {"kind": "tiktoken", "name": name, "source": source, "pat_str": r50k_pat_str, "ranks": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def load_tokenizer(name):
    """The tokenizer named on the command line.

    Args:
        name: "gpt2" for tiktoken's GPT-2 encoding (downloaded on first use, then cached), the path of a
            .tiktoken ranks file (loaded with GPT-2's split pattern and <|endoftext|> after the last rank), or
            the path of a Hugging Face tokenizer.json such as prepare.py --tokenizer=bpe writes.
    Returns:
        Tokenizer.
    Raises:
        UserError: the file is missing or not a ranks file, or the gpt2 download fails (e.g. offline).
    """
    if name == "gpt2":
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"could not load tiktoken's gpt2 encoding, which is downloaded on first use "
                            f"({type(e).__name__}); offline, pass --tokenizer=path/to/gpt2.tiktoken") from None
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}
        return Tokenizer(_tiktoken_spec("gpt2", "gpt2", ranks))
    if not os.path.isfile(name):
        raise UserError(f"tokenizer {name!r} not found: use gpt2, bpe (prepare.py trains one), or the path "
                        f"of a .tiktoken ranks file or a tokenizer.json")
    if name.endswith(".json"):
        with open(name, encoding="utf-8") as f:
            return Tokenizer(bpe_spec(f.read(), name))
    from tiktoken.load import load_tiktoken_bpe
    try:
        ranks = load_tiktoken_bpe(name)
    except Exception as e:
        raise UserError(f"{name} is not a .tiktoken ranks file ({type(e).__name__}: {e})") from None
    stem = os.path.splitext(os.path.basename(name))[0]
    return Tokenizer(_tiktoken_spec(stem, os.path.abspath(name), ranks))


def tokenizer_from_meta(meta, data_dir):
    """The tokenizer that prepare.py wrote into `data_dir` (meta["tokenizer"]["file"]), checked against the
    fingerprint in `meta` (a loaded meta.json). Returns Tokenizer.
    Raises UserError if the file is missing or has changed since the data was prepared."""
    desc = meta["tokenizer"]
    if "file" not in desc:
        raise UserError(f"{data_dir} was prepared by an older prepare.py: re-run it with --force")
    path = os.path.join(data_dir, desc["file"])
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        raise UserError(f"{path} is missing: re-run prepare.py with --force") from None
    if hashlib.sha256(text.encode()).hexdigest() != desc["sha256"]:
        raise UserError(f"{path} has changed since {data_dir} was prepared: re-run prepare.py with --force")
    return Tokenizer({**desc, "ranks" if desc["kind"] == "tiktoken" else "json": text})


def bits_per_byte(loss, tokens, n_bytes):
    """Convert a mean cross-entropy in nats per token into bits per UTF-8 byte of text:
    loss / ln 2 * tokens / bytes, with the token and byte counts of the same text (meta.json has them per split).
    Unlike loss per token it does not depend on how the tokenizer cuts the text, so runs with different
    vocabularies compare (the measure used for the Pile, Gao et al. 2020)."""
    return loss / math.log(2) * tokens / n_bytes


# --------------------------------------------------------------------------------------------------------------
# Device and precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device="auto", dtype="auto", cuda=None, mps=None, cuda_bf16=None, quantize=""):
    """Choose the device and the autocast precision.

    Args:
        device: "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16". "auto" is bfloat16 on CUDA GPUs that support it
            and on CPU, float16 on other CUDA GPUs and on MPS.
        quantize: "" or "int8" (quantize_int8), which runs on the CPU in float32: auto then means those.
        cuda, mps, cuda_bf16: what this machine has; detected when None (tests pass them in).
    Returns:
        (device, device_type, dtype): e.g. ("cuda:0", "cuda", "bfloat16").
    Raises:
        UserError: the device or dtype is unknown or not available here (the message lists what is), or
            quantize is not "" or "int8", or int8 is asked for off the CPU or with a 16-bit dtype.
    """
    if quantize not in ("", "int8"):
        raise UserError(f"quantize={quantize!r}: the only quantization is int8 (or leave it empty)")
    if quantize:
        if device not in ("auto", "cpu") or dtype not in ("auto", "float32"):
            raise UserError("--quantize=int8 runs on the CPU with float32 activations: drop --device/--dtype or "
                            "use --device=cpu --dtype=float32")
        device, dtype = "cpu", "float32"
    cuda_probe = cuda is None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()) if mps is None else mps
    available = [d for d, ok in (("cuda", cuda), ("mps", mps), ("cpu", True)) if ok]
    if device == "auto":
        device = available[0]
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device {device!r}: use auto, cpu, mps, cuda or cuda:N")
    if device_type not in available:
        why = " (MPS needs a Mac with Apple silicon)" if device_type == "mps" else ""
        raise UserError(f"device {device!r} is not available on this machine{why}; "
                        f"available: {', '.join(available)}")
    if device_type == "cuda":
        index, count = torch.device(device).index, torch.cuda.device_count() if cuda_probe else None
        if count is not None and index is not None and index >= count:
            raise UserError(f"device {device!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
                            f"cuda:{count - 1}")
        cuda_bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cpu" or (device_type == "cuda" and cuda_bf16) else "float16"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and device_type == "cuda" and not cuda_bf16:
        raise UserError("this GPU does not support bfloat16: use --dtype=float16 (with loss scaling) or float32")
    return device, device_type, dtype


def keep_freed_memory():
    """On Linux with glibc, have malloc keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees hundreds of MB (the logits over a 50k vocabulary alone are
    tokens x 50,304 floats). glibc serves blocks that large with a fresh mmap each time, so every step faults
    those pages in again: on 2 cores, as much kernel time as the math itself. With mmap off and trimming
    raised, config/tinystories_cpu.py went from 1,069 to 490 ms/iter in bfloat16 (see README, Performance).
    The process then keeps its peak resident size. Does nothing where glibc's mallopt is not available."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: every allocation from the heap
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at the top of the heap
    except (OSError, AttributeError):
        pass


def autocast(device_type, dtype):
    """Context manager running matmuls in `dtype` (mixed precision, Micikevicius et al. 2018); float32: no-op."""
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def quantize_int8(model):
    """Dynamic int8 quantization of every nn.Linear for CPU inference (Jacob et al. 2018; PyTorch's
    `quantize_dynamic`): weights are stored as int8 with one scale per output channel, activations are quantized
    per batch on the fly, and the matmuls run in int8 (fbgemm/x86 kernels). The tied LM head gets its own int8
    copy; the embeddings stay float32. Run the result on CPU in float32 (no autocast).

    Returns a new model (the argument is not changed). PyTorch marks this API deprecated in favour of torchao;
    its deprecation warnings are silenced here since it works and needs no extra dependency."""
    import copy
    import warnings
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints

class _WriteRecorder:
    """The file object torch.save writes to: it keeps the OSError of a failed write (disk full, file too
    large), which torch itself turns into an unhelpful RuntimeError about file positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Open `path`.tmp (same directory) for writing in `mode` ("w": UTF-8 text, "wb": bytes) and yield it; when the
    block ends without an error, flush and fsync it, rename it over `path` and fsync the directory, so `path` is
    always either the old file or the complete new one. Creates missing folders. On any error (OSError from a
    full disk, Ctrl-C, ...) the temporary file is removed and the error re-raised."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj, path):
    """Write `obj` with torch.save through atomic_file: `path` is always the old file or the complete new one.
    Raises OSError when the write fails (e.g. disk full), after removing the temporary file."""
    with atomic_file(path, "wb") as f:
        writer = _WriteRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_text_atomic(text, path):
    """Write the str `text` to `path` (UTF-8) through atomic_file. Raises OSError (the temporary file removed)."""
    with atomic_file(path) as f:
        f.write(text)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py, with `weights_only=True` so that a file from elsewhere can hold
    tensors and plain data but cannot run code.

    Returns:
        dict with "model" (state dict), "model_args" (GPTConfig fields), "tokenizer" (Tokenizer spec),
        "config" (the training settings) and, in ckpt.pt, the optimizer and training state.
    Raises:
        UserError: missing, truncated or corrupt file, or not a checkpoint of this project.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with `python train.py config/tinystories_cpu.py` "
                        f"or point --out_dir at the directory that holds it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by this project's train.py")
    return ckpt


def model_from_checkpoint(ckpt):
    """Build a GPT from a loaded checkpoint's "model_args" and load its weights. Returns GPT (on the weights'
    device, in train mode). Raises UserError if the weights do not fit the shape."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model shape: {str(e).splitlines()[0]}") from None
    return model.to(next(iter(ckpt["model"].values())).device)
