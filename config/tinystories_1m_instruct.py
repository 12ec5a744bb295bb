# Stories on request (docs/instruct.md): the 1M modern model trained on TinyStories' instructions, each story after
# a "Words: / Features: / Story:" header. Give it after the modern config, which sets the model and the recipe:
#   python train.py config/tinystories_1m_modern.py config/tinystories_1m_instruct.py
# Data (TinyStories' JSON archive, TinyStories_all_data.tar.gz unpacked into data/tinystories-json):
#   python prepare.py --dataset=data/tinystories-json --instruct --tokenizer=bpe --vocab_size=4096 \
#                     --data_dir=data/tinystories-instruct-bpe4096
# Offline, on the stand-in (880 stories), the run measured in docs/instruct.md:
#   python prepare.py --dataset=INSTRUCT --instruct --tokenizer=bpe \
#                     --vocab_size=4096 --data_dir=data/instruct-standin
#   python train.py config/tinystories_1m_modern.py config/tinystories_1m_instruct.py \
#                   --data_dir=data/instruct-standin --max_iters=600 --lr_decay_iters=600
data_dir = "data/tinystories-instruct-bpe4096"
out_dir = "out-1m-instruct"
