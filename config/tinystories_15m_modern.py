# The modern recipe (docs/recipe.md) at the shape of tinystories_15m_bpe.py: 8 layers, 384 wide, BPE
# 4,096 ids, 15.8M parameters, 65,536 tokens per iteration (32 x 256 x 8). Muon for the blocks' matrices, a
# warmup-stable-decay schedule, rotary positions, RMSNorm, SwiGLU, RMSNorm on queries and keys, no biases; exports
# as a Qwen3ForCausalLM. A GPU run (device=auto picks CUDA, else Apple's mps, else the CPU). Not tuned at this
# size: muon_lr is the 1M ladder's best at torch's Muon momentum 0.95 (Muon's update size does not depend on the
# width; Jordan et al. 2024), learning_rate the low end of the ladder's flat optimum for AdamW (8e-3 to 3.2e-2),
# since this run is 10x longer and 3x wider. The 1M config's lower momenta (Muon 0.8 at muon_lr 0.02, AdamW
# beta1 0.6) won in 114 iterations of 2,048 tokens; this run (20,000 of 65,536, not tried with them) keeps 0.95, 0.9.
# Data: python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096
out_dir = "out-tinystories-15m-modern"  # sample.py --out_dir=out-tinystories-15m-modern
data_dir = "data/tinystories-bpe4096"
vocab_size = 4096               # refuse data prepared with another vocabulary
eval_interval = 500
eval_iters = 100
log_interval = 50

batch_size = 32
block_size = 256
gradient_accumulation_steps = 8

n_layer = 8
n_head = 6
n_embd = 384
dropout = 0.0
bias = False
pos_embedding = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optimizer = "muon"
muon_lr = 0.01
learning_rate = 8e-3            # AdamW, for the embedding and the norm gains
weight_decay = 0.1
max_iters = 20000  # the learning rate decays to min_lr by the last one
lr_schedule = "wsd"
warmup_iters = 500
decay_frac = 0.4
min_lr = 8e-4
