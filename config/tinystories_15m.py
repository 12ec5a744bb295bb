# About 15M parameters with the GPT-2 vocabulary (9.7M of them in the token embedding): 12 layers, 192 wide.
# 65,536 tokens per iteration (32 x 256 x 8); 20,000 iterations see 1.3B tokens, about 2.8 epochs.
# A GPU run (device=auto picks CUDA, else Apple's mps, else the CPU). Data: python prepare.py
out_dir = "out-tinystories-15m"  # sample.py --out_dir=out-tinystories-15m
data_dir = "data/tinystories"
eval_interval = 500
eval_iters = 100
log_interval = 50

batch_size = 32
block_size = 256
gradient_accumulation_steps = 8

n_layer = 12
n_head = 6
n_embd = 192
dropout = 0.0
bias = False

learning_rate = 1e-3
max_iters = 20000  # the learning rate decays to min_lr by the last one
weight_decay = 0.1
warmup_iters = 500
min_lr = 1e-4
