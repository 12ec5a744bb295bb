# The tutorial's model: 6 layers, 6 heads, 384 wide, context 128, dropout 0.1, biases; about 30M parameters
# (19.3M of them in the GPT-2 token embedding). 131,072 tokens per iteration (32 x 128 x 32).
# The tutorial decayed to min_lr=5e-4 from learning_rate=1e-4, i.e. the rate rose; here it decays 6e-4 -> 6e-5.
# A GPU run (device=auto picks CUDA, else Apple's mps, else the CPU). Data: python prepare.py
out_dir = "out-tinystories-30m"  # sample.py --out_dir=out-tinystories-30m
data_dir = "data/tinystories"
eval_interval = 500
eval_iters = 100
log_interval = 50

batch_size = 32
block_size = 128
gradient_accumulation_steps = 32

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.1
bias = True

learning_rate = 6e-4
max_iters = 20000  # the learning rate decays to min_lr by the last one
weight_decay = 0.1
warmup_iters = 1000
min_lr = 6e-5
