"""BERT-style masked-LM pre-training of the discriminator-sized encoder: the baseline ELECTRA is compared against.

`minielectra pretrain --objective mlm` trains this instead of the generator + discriminator pair. One step:
1. mask: pick the same positions ELECTRA would (round(15 %) of each sequence's non-special tokens, at least 1, at
   most int(0.155 T)); BERT's recipe then puts [MASK] at 80 % of them, a random word at 10 % and leaves 10 % as
   they are, so the model cannot learn that only [MASK] positions matter.
2. encode the corrupted sequence with ONE encoder of the discriminator's width, depth and heads.
3. predict the original token at every picked position with the tied LM head (dense -> GELU -> LayerNorm ->
   word table.T + bias, ELECTRA's generator head at the discriminator's width): loss = mean cross-entropy over
   the picked positions. Only these ~15 % of the tokens give a learning signal, which is ELECTRA's whole point.

Parameter names: the encoder and the embeddings are stored under `discriminator.electra.*`, exactly where an ELECTRA
run keeps the encoder that gets fine-tuned, so `finetune --init` reads either kind of run the same way and the two
fine-tuned models have identical shapes. The LM head is `mlm.generator_predictions.*` and `mlm.generator_lm_head.bias`
(Hugging Face's ElectraForMaskedLM head names under the prefix `mlm`); fine-tuning throws it away.

Same interface as electra.py: param_shapes, init_model, forward, backward, loss_and_grads, and model_flops next to
bench.model_flops.
"""

import math
from typing import NamedTuple

import numpy as np

from minielectra import electra
from minielectra.backend import dispatch, get_xp
from minielectra.bench import masked_tokens
from minielectra.config import ElectraConfig
from minielectra.electra import DISC, EMB, WORDS, Masking, encoder_dims
from minielectra.nn import init_params, zeros_like
from minielectra.nn.encoder import electra_encoder_backward, electra_encoder_forward, embeddings_shapes, encoder_shapes
from minielectra.nn.heads import generator_head_backward, generator_head_forward, generator_head_shapes

ENCODER = f"{DISC}.electra"
HEAD = "mlm"
MASK_SHARE = 0.8  # of the picks: [MASK]
RANDOM_SHARE = 0.1  # of the picks: a random word; the remaining 10 % keep their token


def param_shapes(config: ElectraConfig):
    """{name: shape}: the embeddings, the discriminator-sized encoder and the tied LM head."""
    d = encoder_dims(config, DISC)
    return {
        **embeddings_shapes(EMB, d),
        **encoder_shapes(ENCODER, d),
        **generator_head_shapes(HEAD, d.hidden_size, config.embedding_size, config.vocab_size),
    }


def init_model(config: ElectraConfig, rng, dtype=np.float32):
    """Fresh parameters, initialised as electra.init_model does."""
    config.validate()
    return init_params(param_shapes(config), rng, config.initializer_range, dtype)


def special_ids(config: ElectraConfig):
    return np.array(sorted({config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id}))


def mask_tokens(input_ids, attention_mask, config: ElectraConfig, rng):
    """electra.mask_tokens' picks with BERT's corruption: 80 % [MASK], 10 % a random word, 10 % unchanged.

    The random word is uniform over the vocabulary without the special tokens: a [PAD] or [CLS] in the middle of a
    sentence would be a signal no real input carries.
    """
    picks = electra.mask_tokens(input_ids, attention_mask, config, rng)
    B, P = picks.positions.shape
    u = rng.random((B, P))
    real = picks.weights > 0
    to_mask = real & (u < MASK_SHARE)
    to_random = real & (u >= MASK_SHARE) & (u < MASK_SHARE + RANDOM_SHARE)
    words = np.setdiff1d(np.arange(config.vocab_size), special_ids(config))
    random_words = words[rng.integers(0, len(words), (B, P))]
    masked_ids = input_ids.copy()
    rows = np.broadcast_to(np.arange(B)[:, None], (B, P))
    masked_ids[rows[to_mask], picks.positions[to_mask]] = config.mask_token_id
    masked_ids[rows[to_random], picks.positions[to_random]] = random_words[to_random].astype(input_ids.dtype)
    return Masking(picks.positions, picks.weights, masked_ids)


class StepCache(NamedTuple):
    encoder: object
    head: object
    rows: object  # (N,) flat indices b * T + t of the picked positions
    dlogits: object  # (N, V) dloss / dlogits
    shape: tuple  # (B, T, C)


class Output(NamedTuple):
    losses: dict  # loss (= mlm_loss), mlm_loss
    metrics: dict  # mlm_acc: the share of picked positions whose original token is the argmax
    masking: Masking  # the corrupted input, to replay a step exactly
    cache: StepCache
    counts: dict  # what the mean loss divides by: {"mlm_loss": N picks} (a host float)
    tallies: dict  # mlm_acc as (numerator, denominator), so that shards can add theirs up (see parallel.py)


def counts(batch, config: ElectraConfig, masking=None):
    """forward's `counts` from the batch alone (electra.counts): the picks of a replayed masking, or the number
    electra.mask_tokens would pick."""
    input_ids, attention_mask = electra._check_batch(batch, config)
    if masking is not None:
        return {"mlm_loss": float((masking.weights > 0).sum())}
    _, k = electra.picks_per_sequence(input_ids, attention_mask, config)
    return {"mlm_loss": float(k.sum())}


def forward(params, batch, config: ElectraConfig, rng, train=True, masking=None):
    """Losses, metrics and backward cache of one MLM step on batch = (input_ids (B, T), attention_mask (B, T)).

    `masking` replaces the drawn one (tests fix the corrupted input this way). As in electra.forward, masking and
    dropout draw from their own Generators seeded from rng, and rng advances by the same amount every step; the
    masking runs on the host and, with params on a device, the masked ids and picked rows are copied up and the loss
    and accuracy come back as 0-d device arrays.
    """
    input_ids, attention_mask = electra._check_batch(batch, config)  # host arrays
    B, T = input_ids.shape
    xp = get_xp(params[WORDS])
    mask_rng, drop_rng = (np.random.default_rng(s) for s in rng.integers(2**63, size=2))
    m = mask_tokens(input_ids, attention_mask, config, mask_rng) if masking is None else masking
    picked = m.weights.reshape(-1) > 0
    rows = (np.arange(B)[:, None] * T + m.positions).reshape(-1)[picked]  # (N,) flat positions
    targets = input_ids.reshape(-1)[rows]  # (N,) the original tokens
    counts = {"mlm_loss": float(len(rows))}
    masked_ids, attention_mask, rows, targets = (xp.asarray(a) for a in (m.masked_ids, attention_mask, rows,
                                                                         targets))  # no-ops on the host

    d = encoder_dims(config, DISC)
    h, enc = electra_encoder_forward(params, ENCODER, EMB, masked_ids, xp.zeros_like(masked_ids), attention_mask, d,
                                     train, drop_rng)  # (B, T, C)
    logits, head = generator_head_forward(params, HEAD, WORDS, h.reshape(B * T, -1)[rows],
                                          config.layer_norm_eps)  # (N, V)
    loss, dlogits = dispatch("softmax_cross_entropy", logits)(logits, targets)
    hits = xp.asarray((logits.argmax(axis=-1) == targets).sum(), dtype=xp.float64)
    tallies = {"mlm_acc": (hits, xp.asarray(float(len(targets))))}
    return Output({"loss": loss, "mlm_loss": loss}, electra.ratios(tallies), m,
                  StepCache(enc, head, rows, dlogits, tuple(h.shape)), counts, tallies)


def total_loss(losses, config: ElectraConfig):
    """The masked-LM loss is its one mean."""
    return losses["mlm_loss"]


def backward(output: Output, params, config: ElectraConfig, shares=None):
    """The grads dict of the mean masked-LM cross-entropy, with the same keys as params; shares {"mlm_loss": a}
    scales it, a shard's part of a whole batch's loss (see parallel.py)."""
    c = output.cache
    grads = zeros_like(params)
    share = 1.0 if shares is None else shares["mlm_loss"]
    dlogits = c.dlogits if share == 1.0 else c.dlogits * c.dlogits.dtype.type(share)
    dx = generator_head_backward(dlogits, c.head, grads, HEAD, WORDS)  # (N, C)
    B, T, C = c.shape
    dh = get_xp(dx).zeros((B * T, C), dtype=dx.dtype)
    dh[c.rows] = dx  # inverts `h.reshape(B * T, -1)[rows]`: the unpicked positions get no gradient from the head
    electra_encoder_backward(dh.reshape(B, T, C), c.encoder, grads, ENCODER, EMB)
    return grads


def loss_and_grads(params, batch, config: ElectraConfig, rng, train=True, masking=None):
    """(losses, metrics, grads) of one MLM step; see `forward` for the arguments."""
    out = forward(params, batch, config, rng, train, masking)
    return out.losses, out.metrics, backward(out, params, config)


def starting_loss(vocab_size):
    """The loss of an untrained model: ln V, a uniform guess over the vocabulary."""
    return math.log(vocab_size)


def model_flops(config: ElectraConfig, batch_size, seq_len):
    """Model FLOPs of one MLM step by DESIGN.md's formula (bench.model_flops counts ELECTRA's the same way): one
    discriminator-sized encoder on every token, the LM head (dense C -> E and the tied E -> V) on the picked rows."""
    rows = batch_size * seq_len
    E, V, L = config.embedding_size, config.vocab_size, config.num_hidden_layers
    C, F = config.hidden_size, config.intermediate_size
    weights = L * (4 * C * C + 2 * C * F) + (E * C if E != C else 0)  # Q, K, V, O, FFN; embeddings_project
    encoder = 6 * weights * rows + 12 * L * seq_len ** 2 * C * batch_size
    return encoder + 6 * (C * E + E * V) * masked_tokens(config, batch_size, seq_len)
