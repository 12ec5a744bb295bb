"""The fast path: model.py's GPT turned, in place, into one that computes the same numbers faster or in less memory.

    model = speed_up(model)   # train.py, eval.py, sample.py, serve.py and bench.py: one line, like torch.compile
                              # (but in place: the same model object comes back, its modules' classes changed)

model.py is the reference a learner reads. Each class below is a subclass of one of its modules that keeps that
module's parameters, buffers and state dict and overrides one method; speed_up gives every module of a model the
fast class of its own class. A checkpoint written by a fast model loads into the reference one and back.

- FastGPT: the head and its loss a chunk of positions at a time (chunked_loss.py): the logits of all positions,
  (tokens x vocab_size) floats and as many for their gradient, never exist at once. On every device.
- On a CPU only, where PyTorch runs these as many small passes over memory:
  - FastRMSNorm and FastAttention.queries_keys: RMSNorm, and QK-norm followed by rotary, with their backward passes
    written out (fused.py), when gradients are on;
  - FastAttention.attend: attention in float32 (PyTorch's CPU kernel is slower in bfloat16), with dropout written
    out so that its mask comes from `dropout` below;
  - FastDropout: a mask from 16 random bits per element instead of one random number per element.
- CheckpointedBlock, with speed_up(model, gradient_checkpointing=True): each block's activations are recomputed
  in the backward pass instead of kept (torch.utils.checkpoint, non-reentrant; Chen et al. 2016, "Training Deep
  Nets with Sublinear Memory Cost"): the memory of one block's activations instead of all of them, for one more
  forward pass of the blocks. The random state is restored for the recomputation, so dropout draws the same masks.
Evaluation and generation (no gradients) and other devices take the reference code where a class says so.
tests/test_fast.py checks each piece, and a whole training run, against the reference. Measured: dev/speed-log.md.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

import fused
from chunked_loss import chunked_cross_entropy
from torch.utils.checkpoint import checkpoint

from model import GPT, Block, CausalSelfAttention, RMSNorm


def training_on_cpu(x):
    """True when x is on a CPU with gradients on: then the norms and rotary go through fused.py."""
    return x.device.type == "cpu" and torch.is_grad_enabled()


class FastGPT(GPT):
    """GPT whose loss comes from chunked_cross_entropy: the same loss and gradients, without holding the logits.
    GPT.logits_and_loss's contract, except that the logits returned with the loss are None. A head that is not an
    nn.Linear (checkpoint.quantize_int8's) takes the reference path."""

    def logits_and_loss(self, x, targets, loss_weights=None):
        if not isinstance(self.lm_head, nn.Linear):
            return super().logits_and_loss(x, targets, loss_weights)
        B, T, C = x.shape
        weights = None if loss_weights is None else loss_weights.reshape(-1)
        return None, chunked_cross_entropy(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(-1), weights)


class FastRMSNorm(RMSNorm):
    """RMSNorm through fused.rms_norm when training on a CPU: float32 math, the output in the autocast dtype (the
    next matmul would cast it anyway), and a backward in fewer passes."""

    def forward(self, x):
        if not training_on_cpu(x):
            return super().forward(x)
        cast = torch.is_autocast_enabled("cpu") and x.dtype == torch.float32  # what autocast casts
        return fused.rms_norm(x, self.weight, self.eps, torch.get_autocast_dtype("cpu") if cast else None)


class FastAttention(CausalSelfAttention):
    """CausalSelfAttention with QK-norm + rotary in one function (fused.norm_rope) and attention in float32 on a
    CPU (see `attend`)."""

    def queries_keys(self, q, k, rope):
        if not (hasattr(self, "q_norm") and rope is not None and training_on_cpu(q)):
            return super().queries_keys(q, k, rope)
        # rope's tables lose their head axis, (T, 1, head_dim // 2) -> (T, head_dim // 2); out in float32
        return tuple(fused.norm_rope(t, norm.weight, rope[0][:, 0], rope[1][:, 0], norm.eps)
                     for t, norm in ((q, self.q_norm), (k, self.k_norm)))

    def attend(self, q, k, v, causal):
        """CausalSelfAttention.attend, answering in v's dtype (the autocast dtype, also when norm_rope made q and k
        float32). On a CPU it runs in float32 (float64 for float64 v) outside autocast, and with dropout it is
        written out: PyTorch takes its unfused path then anyway, and the weights' mask comes from `dropout`."""
        dropout_p = self.dropout_p if self.training else 0.0
        if q.device.type != "cpu":
            return super().attend(q, k, v, causal)
        with torch.autocast("cpu", enabled=False):
            dtype = fused.compute_dtype(v)  # float32 (float64 for float64 input)
            qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
            if dropout_p == 0:
                return F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal).to(v.dtype)
            *batch, T, D = qf.shape
            # the causal mask as -inf above the diagonal, added by the call that scales q k^T (one pass, not three)
            mask = torch.zeros(T, kf.size(-2), dtype=dtype, device=q.device)
            if causal:
                mask = mask.masked_fill(torch.ones_like(mask, dtype=torch.bool).triu(1), float("-inf"))
            att = torch.baddbmm(mask, qf.reshape(-1, T, D), kf.reshape(-1, kf.size(-2), D).mT, alpha=1 / math.sqrt(D))
            y = dropout(att.softmax(dim=-1), dropout_p) @ vf.reshape(-1, vf.size(-2), D)
            return y.view(*batch, T, D).to(v.dtype)


def dropout(x, p):
    """Inverted dropout (Srivastava et al. 2014) in training: each element of x (any shape, on a CPU) becomes 0 with
    probability p and the others are scaled by 1 / (1 - p), so the expected output is x. The mask comes from 16
    random bits per element, cut from 64-bit random numbers, where PyTorch's CPU dropout draws one random number
    per element. p is therefore rounded to a multiple of 1/65536 (0.1 -> 0.100006), and the scale uses the
    rounded p."""
    if p == 0:
        return x
    dropped = min(round(p * 65536), 65535)  # of the 65,536 values of 16 random bits, this many drop the element
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= dropped - 32768
    return torch.where(keep, x, 0) * (65536 / (65536 - dropped))


class FastDropout(nn.Dropout):
    """nn.Dropout with `dropout`'s mask on a CPU in training."""

    def forward(self, x):
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        return dropout(x, self.p)


class CheckpointedBlock(Block):
    """Block whose activations, in training, are recomputed in the backward pass instead of kept (see the module
    docstring). The same outputs and gradients as Block."""

    def forward(self, x, cache=None, layer=0, rope=None):
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(x, cache, layer, rope)
        return checkpoint(super().forward, x, None, layer, rope, use_reentrant=False)


FAST_CLASSES = {GPT: FastGPT, RMSNorm: FastRMSNorm, CausalSelfAttention: FastAttention, nn.Dropout: FastDropout}


def speed_up(model, gradient_checkpointing=False):
    """Give every module of `model` (a model.GPT) the fast class of its class (FAST_CLASSES, and CheckpointedBlock
    for the blocks with gradient_checkpointing), in place: the same parameters, buffers and state dict, the same
    numbers up to rounding. Returns the model. Call it before torch.compile and DistributedDataParallel wrap the
    model; moving it to another device afterwards is fine (each fast class looks at its input's device)."""
    classes = {**FAST_CLASSES, **({Block: CheckpointedBlock} if gradient_checkpointing else {})}
    for module in model.modules():
        fast = classes.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model
