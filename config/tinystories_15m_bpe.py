# About 15.8M parameters with a 4,096-id vocabulary trained on TinyStories: the transformer (8 layers, 384 wide)
# holds 14.2M of them, the token embedding 1.6M. 65,536 tokens per iteration (32 x 256 x 8).
# Data: python prepare.py --tokenizer=bpe --vocab_size=4096 --data_dir=data/tinystories-bpe4096
out_dir = "out-tinystories-15m-bpe"  # sample.py --out_dir=out-tinystories-15m-bpe
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

learning_rate = 1e-3
max_iters = 20000  # the learning rate decays to min_lr by the last one
weight_decay = 0.1
warmup_iters = 500
min_lr = 1e-4
