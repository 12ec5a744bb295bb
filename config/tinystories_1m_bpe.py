# About 1.3M parameters for CPU experiments: the transformer of tinystories_cpu.py (4 layers, 128 wide, 0.8M)
# with a 4,096-id vocabulary trained on TinyStories (0.5M in the embedding). 2,048 tokens per iteration.
# Data: python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096
# (offline: add --dataset=FOLDER, a local copy of TinyStories' text; see README)
out_dir = "out-tinystories-1m-bpe"  # sample.py --out_dir=out-tinystories-1m-bpe
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

learning_rate = 2e-3
max_iters = 2000  # the learning rate decays to min_lr by the last one
warmup_iters = 100
min_lr = 2e-4
