# Stories on request (docs/instruct.md): the 1M modern model trained on TinyStories' instructions, each story after
# a "Words: / Features: / Story:" header. Give it after the modern config, which sets the model and the recipe:
#   python train.py config/tinystories_1m_modern.py config/tinystories_1m_instruct.py
# Data (TinyStories' JSON archive, TinyStories_all_data.tar.gz unpacked into data/tinystories-json):
#   python prepare.py --dataset=data/tinystories-json --instruct --tokenizer=bpe --vocab_size=4096 \
#                     --data_dir=data/tinystories-instruct-bpe4096
# Offline, on the stand-in (880 stories, INSTRUCT = its folder), the run measured in docs/instruct.md:
#   python prepare.py --dataset=INSTRUCT --instruct --tokenizer=bpe --vocab_size=4096 --data_dir=d-ins
#   python train.py config/tinystories_1m_modern.py config/tinystories_1m_instruct.py --data_dir=d-ins \
#       --out_dir=o-ins --max_iters=600 --eval_interval=300 --eval_iters=10 --dtype=float32
data_dir = "data/tinystories-instruct-bpe4096"
out_dir = "out-1m-instruct"
# The asked-for words are about 3 tokens in 200: weighed 8x, the model learns to use them (docs/instruct.md
# measures 1, 5, 8, 10 and 20: above 10 the stories repeat the words over and over).
instruct_word_weight = 8.0
# Six passes over 880 stories memorise them without it (train loss 1.8 against 3.5 on validation); on the whole
# archive, where a story is seen about once, set it back to 0.
dropout = 0.2
