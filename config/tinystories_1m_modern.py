# The modern recipe at the shape of tinystories_1m_bpe.py (4 layers, 128 wide, BPE 4,096 ids, 16 x 128 tokens per
# iteration, 1.32M parameters): Muon for the blocks' matrices, a warmup-stable-decay schedule, rotary positions,
# RMSNorm, a SwiGLU MLP and RMSNorm on queries and keys, no biases. It exports as a Qwen3ForCausalLM.
# Each choice and its measured gain: docs/recipe.md. The learning rates and momenta are the best of the ladder's
# sweeps (dev/speed-log.md, "The ladder: one pass over the sample").
# Data: python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096
# (offline: add --dataset=FOLDER, a local copy of TinyStories' text; see README)
out_dir = "out-tinystories-1m-modern"  # sample.py --out_dir=out-tinystories-1m-modern
data_dir = "data/tinystories-bpe4096"
vocab_size = 4096               # refuse data prepared with another vocabulary
eval_interval = 200
eval_iters = 20
log_interval = 50

batch_size = 16
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_embedding = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True
tie_embeddings = True           # an untied head would add 0.5M parameters (40%) at this size

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.8             # torch's 0.95 wants muon_lr 0.01 and ends 2.5% worse in the one-pass ladder
learning_rate = 3.2e-2          # AdamW, for the embedding and the norm gains: 16x the GPT-2 recipe's best
beta1 = 0.6                     # AdamW's momentum (GPT-2's 0.9; 0.8, 0.7, 0.5 were worse in the one-pass ladder)
max_iters = 2000  # the learning rate decays to min_lr by the last one
lr_schedule = "wsd"
warmup_iters = 100
decay_frac = 0.4
min_lr = 3.2e-3                 # both learning rates end at 1/10 of their peak
