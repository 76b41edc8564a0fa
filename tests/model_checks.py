"""Shared by the model tests: a tiny config, a padded batch, a float64 model (test_electra.py, test_mlm.py), a small
text corpus for training runs (test_train.py, test_device_step.py) and a progress bar that presses Ctrl-C."""

import signal

import numpy as np
from tqdm import tqdm

from minielectra.config import ElectraConfig

SMALL = ElectraConfig(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=12, generator_hidden_size=4, generator_num_attention_heads=1,
                      generator_intermediate_size=8, max_position_embeddings=16, mask_prob=0.3)


def padded_batch(rng, B, T, V, pad_last=3):
    """(ids, mask) (B, T) of random words in [CLS] ... [SEP]; the last sequence ends in pad_last [PAD]s."""
    ids = rng.integers(5, V, (B, T))
    ids[:, 0], ids[:, -1] = 2, 3
    mask = np.ones_like(ids)
    ids[-1, T - pad_last:] = 0  # the last sequence is padded: [CLS] ... [SEP] [PAD] [PAD] [PAD]
    ids[-1, T - pad_last - 1] = 3
    mask[-1, T - pad_last:] = 0
    return ids, mask


def float64_model(init_model, config, seed=0):
    """init_model(config, rng, float64) with every parameter moved off its init, so that biases at 0 and gains at 1
    are not special cases of their gradients."""
    params = init_model(config, np.random.default_rng(seed), np.float64)
    rng = np.random.default_rng(seed + 1)
    for k in params:
        params[k] += rng.standard_normal(params[k].shape) * 0.3
    return params


CORPUS_WORDS = ("the quick brown fox jumps over the lazy dog while a generator proposes words and a discriminator "
                "decides which of them were replaced").split()


def write_corpus(path, docs=80, seed=0):
    """A text file of `docs` blank-line-separated documents of 20-59 random CORPUS_WORDS; returns path."""
    rng = np.random.default_rng(seed)
    text = "\n\n".join(" ".join(rng.choice(CORPUS_WORDS, size=rng.integers(20, 60))) + "." for _ in range(docs))
    path.write_text(text, encoding="utf-8")
    return path


def interrupting_bar(at):
    """A tqdm whose update raises SIGINT once `at` steps are counted (over all its bars): a Ctrl-C that lands late in
    a step, after the step's own checks of the stop flag. Its handler runs before update returns."""
    count = [0]  # counted here: a disabled bar does not count

    class InterruptingBar(tqdm):
        def update(self, n=1):
            super().update(n)
            count[0] += n
            if count[0] == at:
                signal.raise_signal(signal.SIGINT)

    return InterruptingBar
