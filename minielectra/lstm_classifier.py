"""The pre-Transformer baseline: embedding -> LSTM -> dense -> softmax cross-entropy, trained from scratch.

    ids (B, T)  ->  word embeddings (B, T, E)  ->  dropout  ->  LSTM, padded steps skipped  ->  h_T (B, H)
                ->  dropout  ->  dense (H -> labels)  ->  softmax cross-entropy

It reads the same batches as the Transformer classifier (input_ids, attention_mask, token_type_ids, labels): the
tokens are WordPiece ids with [CLS] and [SEP] in place, the token types are ignored (a sentence pair is read as one
sequence) and the state after each row's last real token is what the head sees. Same interface as classifier.py
(forward, backward, loss_and_grads, classifier_shapes, init_classifier, layer_lr_scales), so finetune runs either.

Parameters (no Hugging Face model to follow; PyTorch-like names, W stored (in, out) as everywhere here):
    lstm.embeddings.word_embeddings.weight (V, E)
    lstm.rnn.weight_ih (E, 4H), lstm.rnn.weight_hh (H, 4H), lstm.rnn.bias (4H,)   gates in the order i, f, g, o
    classifier.out_proj.weight (H, labels), classifier.out_proj.bias (labels,)
Init as PyTorch's nn.LSTM: uniform(+-1 / sqrt(H)) for the LSTM and the head, but the forget gate's bias starts at 1
(Jozefowicz et al. 2015) so the cell remembers by default and gradients reach early tokens; embeddings N(0, 0.1).
"""

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from minielectra.backend import dispatch, get_xp
from minielectra.config import N_SPECIAL_TOKENS, ConfigError
from minielectra.nn import zeros_like
from minielectra.nn.encoder import dense_backward, dense_forward
from minielectra.ops import checks
from minielectra.ops.dropout import dropout_backward, dropout_forward
from minielectra.ops.embedding import embedding_backward, embedding_forward
from minielectra.ops.lstm import lstm_backward, lstm_forward

WORDS = "lstm.embeddings.word_embeddings.weight"
RNN = "lstm.rnn"
HEAD = "classifier"
EMBEDDING_STD = 0.1


@dataclass
class LSTMConfig:
    vocab_size: int = 8192  # set from the tokenizer
    embedding_size: int = 128  # E
    hidden_size: int = 128  # H, the LSTM state
    dropout: float = 0.1  # on the embeddings and on the final state, during training only

    def validate(self):
        problems = []
        if self.vocab_size <= N_SPECIAL_TOKENS:
            problems.append(f"vocab_size {self.vocab_size} leaves no room for words beside the special tokens")
        if min(self.embedding_size, self.hidden_size) < 1:
            problems.append(f"embedding_size and hidden_size must be positive (got {self.embedding_size}, "
                            f"{self.hidden_size})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ConfigError("invalid LSTM config: " + "; ".join(problems))
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown LSTMConfig field(s) {', '.join(unknown)}")
        return cls(**values).validate()


def classifier_shapes(config: LSTMConfig, num_labels):
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2 (binary classification has 2), got {num_labels!r}")
    E, H = config.embedding_size, config.hidden_size
    return {WORDS: (config.vocab_size, E), f"{RNN}.weight_ih": (E, 4 * H), f"{RNN}.weight_hh": (H, 4 * H),
            f"{RNN}.bias": (4 * H,), f"{HEAD}.out_proj.weight": (H, int(num_labels)),
            f"{HEAD}.out_proj.bias": (int(num_labels),)}


def init_classifier(config: LSTMConfig, num_labels, rng, dtype=np.float32):
    """Fresh parameters (see the module docstring); names drawn in sorted order, as nn.init_params does."""
    config.validate()
    shapes = classifier_shapes(config, num_labels)
    H = config.hidden_size
    bound = 1.0 / np.sqrt(H)
    params = {}
    for name in sorted(shapes):
        if name == WORDS:
            params[name] = rng.normal(0.0, EMBEDDING_STD, shapes[name]).astype(dtype)
        elif name == f"{HEAD}.out_proj.bias":
            params[name] = np.zeros(shapes[name], dtype)
        else:
            params[name] = rng.uniform(-bound, bound, shapes[name]).astype(dtype)
    params[f"{RNN}.bias"][:] = 0.0
    params[f"{RNN}.bias"][H:2 * H] = 1.0  # the forget gate
    return params


class LSTMClassifierCache(NamedTuple):
    words: object  # EmbeddingCache
    drop_in: object
    lstm: object  # LSTMCache
    drop_out: object
    out: object  # LinearCache of classifier.out_proj
    dlogits: object  # (B, labels) dloss/dlogits, None without labels


def _check_batch(batch, config):
    if len(batch) != 4:
        raise ValueError("batch is (input_ids, attention_mask, token_type_ids, labels or None)")
    input_ids, attention_mask, _, labels = batch
    checks.int_array("input_ids", input_ids)
    checks.ndim("input_ids", input_ids, 2, "(B, T)")
    checks.shape("attention_mask", attention_mask, input_ids.shape, "(B, T) like input_ids")
    if input_ids.size and checks.readable(input_ids) and (int(input_ids.min()) < 0
                                                          or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size {config.vocab_size}): was the data tokenised with "
                         "this model's vocab?")
    if labels is not None:
        checks.int_array("labels", labels)
        checks.shape("labels", labels, input_ids.shape[:1], "(B,)")
    return input_ids, attention_mask, labels


def forward(params, batch, config: LSTMConfig, num_labels, rng=None, train=False):
    """(loss, logits (B, labels), cache) on batch = (input_ids, attention_mask, token_type_ids, labels or None), as
    classifier.forward: loss None without labels; dropout on with train=True, drawn from rng in a fixed order."""
    input_ids, attention_mask, labels = _check_batch(batch, config)
    if labels is not None and labels.size and checks.readable(labels) and (int(labels.min()) < 0
                                                                          or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    # A host batch is checked above for free, then copied to the params' device (no-ops on the host).
    xp = get_xp(params[WORDS])
    input_ids, attention_mask = xp.asarray(input_ids), xp.asarray(attention_mask)
    labels = None if labels is None else xp.asarray(labels)
    p = config.dropout if train else 0.0
    x, words = embedding_forward(input_ids, params[WORDS])  # (B, T, E)
    x, drop_in = dropout_forward(x, p, rng, train)
    h, lstm = lstm_forward(x, attention_mask, params[f"{RNN}.weight_ih"], params[f"{RNN}.weight_hh"],
                           params[f"{RNN}.bias"])  # (B, H): the state after each row's last real token
    h, drop_out = dropout_forward(h, p, rng, train)
    logits, out = dense_forward(params, f"{HEAD}.out_proj", h)  # (B, labels)
    if logits.shape[1] != num_labels:
        raise ValueError(f"the params' head has {logits.shape[1]} labels, not num_labels {num_labels}")
    loss = dlogits = None
    if labels is not None:
        loss, dlogits = dispatch("softmax_cross_entropy", logits)(logits, labels)
    return loss, logits, LSTMClassifierCache(words, drop_in, lstm, drop_out, out, dlogits)


def backward(params, cache: LSTMClassifierCache, dlogits=None):
    """The grads dict (same keys as params) of the forward's loss, or of sum(logits * dlogits) when dlogits is given."""
    dlogits = cache.dlogits if dlogits is None else dlogits
    if dlogits is None:
        raise ValueError("the forward ran without labels, so there is no loss to differentiate: pass dlogits")
    grads = zeros_like(params)
    dh = dense_backward(dlogits, cache.out, grads, f"{HEAD}.out_proj")  # (B, H)
    dh = dropout_backward(dh, cache.drop_out)
    dx, dWx, dWh, db = lstm_backward(dh, cache.lstm)  # inverts `h = lstm(x)[last real step]`
    grads[f"{RNN}.weight_ih"] += dWx
    grads[f"{RNN}.weight_hh"] += dWh
    grads[f"{RNN}.bias"] += db
    dx = dropout_backward(dx, cache.drop_in)
    grads[WORDS] += embedding_backward(dx, cache.words)
    return grads


def loss_and_grads(params, batch, config: LSTMConfig, num_labels, rng=None, train=True):
    """(loss, logits, grads) of one step."""
    loss, logits, cache = forward(params, batch, config, num_labels, rng, train)
    return loss, logits, backward(params, cache)


def layer_lr_scales(params):
    """{name: 1.0}: layer-wise learning-rate decay is for pre-trained layers, and nothing here was pre-trained."""
    return {k: 1.0 for k in params}
