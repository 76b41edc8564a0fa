"""Sequence classification: ELECTRA's discriminator encoder with a classification head on the [CLS] vector.

    [CLS] a [SEP] (b [SEP])  ->  discriminator encoder  ->  h[:, 0]  ->  dropout -> dense (C -> C) -> GELU -> dropout
                             ->  dense (C -> labels)  ->  softmax cross-entropy

This is Hugging Face's ElectraForSequenceClassification (and the official code's classification head). Parameter
names are exactly the ones a pre-training checkpoint and Hugging Face use:

    discriminator.electra.embeddings.*      the embedding tables and their LayerNorm (ELECTRA's shared ones)
    discriminator.electra.embeddings_project.*, discriminator.electra.encoder.layer.<i>.*
    classifier.dense.weight/bias, classifier.out_proj.weight/bias     the head (W stored (in, out), as everywhere)

so fine-tuning from a pre-training run copies the `discriminator.electra.*` keys and nothing else (the generator and
the replaced-token head are thrown away, as in the paper), and exporting to Hugging Face is `discriminator.electra.`
-> `electra.` plus the usual transpose.
"""

from typing import NamedTuple

import numpy as np

from minielectra.backend import dispatch, get_xp
from minielectra.config import ElectraConfig
from minielectra.electra import DISC, EMB, encoder_dims
from minielectra.nn import init_params as fresh_params
from minielectra.nn import zeros_like
from minielectra.nn.encoder import (dense_backward, dense_forward, electra_encoder_backward, electra_encoder_forward,
                                    embeddings_shapes, encoder_shapes)
from minielectra.ops import checks
from minielectra.ops.dropout import dropout_backward, dropout_forward

ENCODER = f"{DISC}.electra"  # the encoder's own parameters; the embeddings live under EMB (also inside this prefix)
HEAD = "classifier"


def classifier_shapes(config: ElectraConfig, num_labels):
    """{name: shape} of every parameter: the discriminator encoder (embeddings included) and the head."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2 (binary classification has 2), got {num_labels!r}")
    d = encoder_dims(config, DISC)
    C = d.hidden_size
    return {
        **embeddings_shapes(EMB, d),
        **encoder_shapes(ENCODER, d),
        f"{HEAD}.dense.weight": (C, C), f"{HEAD}.dense.bias": (C,),
        f"{HEAD}.out_proj.weight": (C, int(num_labels)), f"{HEAD}.out_proj.bias": (int(num_labels),),
    }


def init_classifier(config: ElectraConfig, num_labels, rng, init_params=None, dtype=np.float32):
    """Parameters of a fresh classifier; with `init_params` (a pre-training run's params dict) the encoder's are copies
    of those, and only the head is new. Keys the checkpoint lacks, or holds with another shape, are a ValueError."""
    config.validate()
    shapes = classifier_shapes(config, num_labels)
    params = fresh_params(shapes, rng, config.initializer_range, dtype)
    if init_params is not None:
        encoder_keys = [k for k in shapes if not k.startswith(f"{HEAD}.")]
        missing = [k for k in encoder_keys if k not in init_params]
        if missing:
            raise ValueError(f"the pre-trained params lack {len(missing)} encoder parameter(s), e.g. {missing[0]}: is "
                             "this an ELECTRA pre-training checkpoint of the same config?")
        wrong = [f"{k} {tuple(init_params[k].shape)} (expected {shapes[k]})" for k in encoder_keys
                 if tuple(init_params[k].shape) != tuple(shapes[k])]
        if wrong:
            raise ValueError(f"pre-trained params of the wrong shape for this config: {'; '.join(wrong[:3])}")
        for k in encoder_keys:
            params[k] = np.array(init_params[k], dtype=dtype)  # a copy: fine-tuning must not touch the source dict
    return params


class ClassifierCache(NamedTuple):
    encoder: object  # EncoderCache
    shape: tuple  # (B, T, C) of the encoder output
    drop1: object
    dense: object  # LinearCache of classifier.dense (its bias is added by bias_gelu)
    gelu: object
    drop2: object
    out: object  # LinearCache of classifier.out_proj
    dlogits: object  # (B, labels) dloss/dlogits, None when no labels were given


def _check_batch(batch, config):
    if len(batch) != 4:
        raise ValueError("batch is (input_ids, attention_mask, token_type_ids, labels or None)")
    input_ids, attention_mask, token_type_ids, labels = batch
    checks.int_array("input_ids", input_ids)
    checks.ndim("input_ids", input_ids, 2, "(B, T)")
    checks.shape("attention_mask", attention_mask, input_ids.shape, "(B, T) like input_ids")
    checks.shape("token_type_ids", token_type_ids, input_ids.shape, "(B, T) like input_ids")
    if input_ids.size and checks.readable(input_ids) and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size {config.vocab_size}): was the data tokenised with "
                         "this model's vocab?")
    if labels is not None:
        checks.int_array("labels", labels)
        checks.shape("labels", labels, input_ids.shape[:1], "(B,)")
    return input_ids, attention_mask, token_type_ids, labels


def forward(params, batch, config: ElectraConfig, num_labels, rng=None, train=False):
    """(loss, logits (B, labels), cache) on batch = (input_ids, attention_mask, token_type_ids, labels or None).

    loss is the mean softmax cross-entropy (None without labels). With train=True dropout is on and draws from `rng`
    (a numpy Generator), in a fixed order, so the same seed replays the same masks.
    """
    input_ids, attention_mask, token_type_ids, labels = _check_batch(batch, config)
    if labels is not None and labels.size and checks.readable(labels) and (int(labels.min()) < 0
                                                                          or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got values in [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    # A host batch is checked above for free, then copied to the params' device (no-ops on the host).
    xp = get_xp(params[f"{HEAD}.out_proj.weight"])
    input_ids, attention_mask, token_type_ids = (xp.asarray(a) for a in (input_ids, attention_mask, token_type_ids))
    labels = None if labels is None else xp.asarray(labels)
    d = encoder_dims(config, DISC)
    p = d.hidden_dropout if train else 0.0
    h, enc = electra_encoder_forward(params, ENCODER, EMB, input_ids, token_type_ids, attention_mask, d, train,
                                     rng)  # (B, T, C)
    x = h[:, 0]  # (B, C): the [CLS] vector; no pooler, as ELECTRA
    x, drop1 = dropout_forward(x, p, rng, train)
    x, dense = dispatch("matmul_forward", x)(x, params[f"{HEAD}.dense.weight"])  # (B, C)
    x, gelu = dispatch("bias_gelu_forward", x)(x, params[f"{HEAD}.dense.bias"])
    x, drop2 = dropout_forward(x, p, rng, train)
    logits, out = dense_forward(params, f"{HEAD}.out_proj", x)  # (B, labels)
    if logits.shape[1] != num_labels:
        raise ValueError(f"the params' head has {logits.shape[1]} labels, not num_labels {num_labels}")
    loss = dlogits = None
    if labels is not None:
        loss, dlogits = dispatch("softmax_cross_entropy", logits)(logits, labels)
    return loss, logits, ClassifierCache(enc, tuple(h.shape), drop1, dense, gelu, drop2, out, dlogits)


def backward(params, cache: ClassifierCache, dlogits=None):
    """The grads dict (same keys as params) of the forward's loss, or of sum(logits * dlogits) when dlogits is given."""
    dlogits = cache.dlogits if dlogits is None else dlogits
    if dlogits is None:
        raise ValueError("the forward ran without labels, so there is no loss to differentiate: pass dlogits")
    grads = zeros_like(params)
    dx = dense_backward(dlogits, cache.out, grads, f"{HEAD}.out_proj")  # (B, C)
    dx = dropout_backward(dx, cache.drop2)
    dx, db = dispatch("bias_gelu_backward", dx)(dx, cache.gelu)  # inverts `gelu(x @ W + b)`
    grads[f"{HEAD}.dense.bias"] += db
    dx, dW = dispatch("matmul_backward", dx)(dx, cache.dense)
    grads[f"{HEAD}.dense.weight"] += dW
    dx = dropout_backward(dx, cache.drop1)
    dh = get_xp(dx).zeros(cache.shape, dtype=dx.dtype)  # (B, T, C): only the [CLS] position feeds the head
    dh[:, 0] = dx  # inverts `x = h[:, 0]`
    electra_encoder_backward(dh, cache.encoder, grads, ENCODER, EMB)
    return grads


def loss_and_grads(params, batch, config: ElectraConfig, num_labels, rng=None, train=True):
    """(loss, logits, grads) of one step."""
    loss, logits, cache = forward(params, batch, config, num_labels, rng, train)
    return loss, logits, backward(params, cache)


def probabilities(logits):
    """softmax over the labels, (B, labels), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def layer_depths(params, num_layers):
    """{name: depth} for layer-wise learning-rate decay, as the official code's `_get_layer_lrs`: embeddings (and
    embeddings_project) 0, encoder layer i at i + 1, the task head at num_layers + 2 (one above BERT's pooler, a
    depth ELECTRA keeps though nothing sits there)."""
    depths = {}
    for k in params:
        if k.startswith(f"{HEAD}."):
            depths[k] = num_layers + 2
        elif k.startswith(f"{ENCODER}.encoder.layer."):
            depths[k] = int(k[len(f"{ENCODER}.encoder.layer."):].split(".")[0]) + 1
        else:
            depths[k] = 0
    return depths


def layer_lr_scales(params, num_layers, decay):
    """{name: lr multiplier} = decay ** (num_layers + 2 - depth), exactly the official code: the head 1, encoder
    layer i decay^(L + 1 - i), the embeddings decay^(L + 2).

    Layers nearer the input change less, since what they learned in pre-training is the most general (Clark et al.
    2020, appendix: layer-wise learning-rate decay, 0.8 for ELECTRA-Small).
    """
    depths = layer_depths(params, num_layers)
    return {k: float(decay) ** (num_layers + 2 - depth) for k, depth in depths.items()}
