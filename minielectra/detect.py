"""What the discriminator sees: for each token of a text, the probability that it was replaced.

This is ELECTRA's pre-training task put to work on your own sentence: swap a word for a plausible wrong one
("the chef ate the meal" -> "the chef drank the meal") and a trained discriminator gives the swapped token a high
probability. The text is encoded as in pre-training, [CLS] tokens [SEP], without padding, and run through the
discriminator's encoder and its head (dense -> GELU -> dense -> one logit per token), dropout off.
"""

from typing import NamedTuple

import numpy as np

from minielectra import hf
from minielectra.electra import DISC, EMB, encoder_dims
from minielectra.nn.encoder import electra_encoder_forward
from minielectra.nn.heads import discriminator_head_forward
from minielectra.tokenizer import WordPieceTokenizer


class Discriminator(NamedTuple):
    params: dict
    config: object  # ElectraConfig
    tokenizer: WordPieceTokenizer


class Detection(NamedTuple):
    text: str
    tokens: list  # WordPiece strings, [CLS] and [SEP] included
    ids: list
    logits: list  # one raw logit per token (float32 values); > 0 means "replaced"
    probs: list  # sigmoid(logits)


def load_discriminator(path):
    """The discriminator of a pre-training run folder, or of a Hugging Face discriminator imported with import-hf."""
    params, config, vocab, labels = hf.load_folder(path)
    if labels is not None:
        raise hf.HFError(f"{path} is a fine-tuned classifier: fine-tuning drops the replaced-token head, so there is "
                         "nothing to detect with; give a pre-training run (or an imported ElectraForPreTraining)")
    if DISC not in hf.parts_of(params, config):
        raise hf.HFError(f"{path} has no discriminator (it holds: {', '.join(hf.parts_of(params, config)) or 'none'})"
                         ": detect needs a pre-training run or an imported ElectraForPreTraining")
    return Discriminator(params, config, WordPieceTokenizer(vocab))


def discriminator_logits(params, config, input_ids, attention_mask, token_type_ids=None):
    """Replaced-token logits (B, T) for input_ids (B, T), dropout off."""
    types = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    h, _ = electra_encoder_forward(params, f"{DISC}.electra", EMB, input_ids, types, attention_mask,
                                   encoder_dims(config, DISC), train=False)  # (B, T, C)
    logits, _ = discriminator_head_forward(params, DISC, h)  # (B, T)
    return logits


def encode(tok, text, max_len):
    """[CLS] ids [SEP] for one text, cut to max_len tokens."""
    return [tok.cls_id] + tok.encode(text)[:max_len - 2] + [tok.sep_id]


def detect(model, texts):
    """A Detection per text; `model` a folder or a loaded Discriminator."""
    m = model if isinstance(model, Discriminator) else load_discriminator(model)
    results = []
    for text in texts:
        ids = np.asarray([encode(m.tokenizer, text, m.config.max_position_embeddings)], dtype=np.int64)  # (1, T)
        logits = discriminator_logits(m.params, m.config, ids, np.ones_like(ids))[0]  # (T,)
        z = np.asarray(logits, dtype=np.float64)
        results.append(Detection(text, [m.tokenizer.id_to_token(i) for i in ids[0]], ids[0].tolist(),
                                 [float(x) for x in logits], (1.0 / (1.0 + np.exp(-z))).tolist()))
    return results


def format_detection(d: Detection, threshold=0.5):
    """One line per token: the token, its probability of having been replaced, and a mark above the threshold."""
    width = max(len(t) for t in d.tokens)
    lines = [f"{d.text}", f"{'token':<{width}}  p(replaced)"]
    for tok, p in zip(d.tokens, d.probs):
        lines.append(f"{tok:<{width}}  {p:.4f}" + ("  <- replaced?" if p > threshold else ""))
    return "\n".join(lines)


def to_json(d: Detection):
    return {"text": d.text, "tokens": d.tokens, "ids": d.ids, "logits": d.logits}

