# A small GPT that trains on a laptop CPU in minutes and already writes recognisable English.
# About 7.2M parameters, 6.4M of them in the GPT-2 token embedding; 2,048 tokens per iteration.
# Data: python prepare.py                 (offline, with --dataset and --tokenizer: see README)
out_dir = "out-tinystories-cpu"  # sample.py --out_dir=out-tinystories-cpu
eval_interval = 100
eval_iters = 20
log_interval = 10

batch_size = 16
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 500  # the learning rate decays to min_lr by the last one
warmup_iters = 50
min_lr = 2e-4
