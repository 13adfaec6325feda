"""
Data: the tiny tokenizer builder (more to come: the LVR/Mirage formats and the synthetic task).

The tiny tokenizer is a byte-level BPE, like Qwen's, trained in a fraction of a second on a
small corpus, so it can encode any text; it holds every Qwen special token, and the
checkpoint code looks them up by string exactly as it does for the real tokenizer.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]

CORPUS = [
    "system\nYou are a helpful assistant.", "user\n", "assistant\n",
    "What colour is the small circle? red green blue yellow purple orange white black",
    "What shape is left of the square? circle square triangle star cross diamond",
    "Which object is above, below, left of, right of the other one? The answer is: yes no",
    "<answer> </answer> 0 1 2 3 4 5 6 7 8 9 A B C D a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_tokenizer(path=None, vocab_size=512, special=QWEN_SPECIAL, corpus=CORPUS):
    """Byte-level BPE with the given special tokens; written to `path` (tokenizer.json) if given."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if path:
        tok.save(path)
    return tok
