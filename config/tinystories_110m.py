# The modern recipe (docs/recipe.md) at 109.3M parameters for one GPU: 15 layers, 768 wide (12 heads of 64), BPE
# 4,096 ids, context 512, 131,072 tokens per iteration (16 x 512 x 16). The size of llama2.c's largest TinyStories
# model (110M, with a 32K vocabulary: here the parameters sit in the blocks). Exports as a Qwen3ForCausalLM.
# Not tuned at this size; the reasoning behind each value:
# - muon_lr 0.01 at Muon's momentum 0.95: the 1M ladder's best at that momentum, and Muon's update size does not
#   depend on the width (Jordan et al. 2024), so it carries over.
# - learning_rate 3e-3 (AdamW: the embedding and the norm gains): below the 70M config's 4e-3, as the embedding
#   grows wider again; the ladder's optimum for AdamW was flat over 8e-3 to 3.2e-2 at 128 wide.
# - 20,000 iterations of 131,072 tokens are 2.6B tokens, several passes over TinyStories (about 4 bytes of text per
#   token with this vocabulary, docs/tokenizers.md): train.py says how many at the start; best_model_params.pt keeps
#   the best validation loss.
# - the micro-batch and its accumulation give the tokens per iteration: on a GPU with more memory raise batch_size
#   and lower gradient_accumulation_steps (the same tokens per iteration); with less, gradient_checkpointing=True
#   (README's table gives the peak memory of a step; docs/performance.md what checkpointing saves).
# Data: python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096
out_dir = "out-tinystories-110m"  # sample.py --out_dir=out-tinystories-110m
data_dir = "data/tinystories-bpe4096"
vocab_size = 4096               # refuse data prepared with another vocabulary
eval_interval = 500
eval_iters = 100
log_interval = 50

batch_size = 16
block_size = 512
gradient_accumulation_steps = 16

n_layer = 15
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
pos_embedding = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True

optimizer = "muon"
muon_lr = 0.01
learning_rate = 3e-3            # AdamW, for the embedding and the norm gains
weight_decay = 0.1
max_iters = 20000  # the learning rate decays to min_lr by the last one
lr_schedule = "wsd"
warmup_iters = 500
decay_frac = 0.4
min_lr = 3e-4
