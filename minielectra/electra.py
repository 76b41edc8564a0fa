"""ELECTRA pre-training: a small generator (masked LM) and a discriminator (replaced-token detection), trained jointly.

One step, as in Clark et al. (2020) and the official code:
1. mask: pick round(15 %) of each sequence's non-special tokens; 85 % of them become [MASK], 15 % stay as they are.
2. generator: encode the masked sequence, predict the original token at every picked position (MLM loss).
3. sample: draw a replacement at every picked position from the generator's softmax with the Gumbel-max trick.
   No gradient flows through the sample: the generator is trained by its MLM loss alone, not adversarially.
4. discriminator: encode the original sequence with the samples written in, and say for EVERY non-pad token whether
   it was replaced (a sample equal to the original counts as original). Learning from all tokens, not just the 15 %
   that were masked, is what makes ELECTRA compute-efficient.
5. loss = mlm + 50 * rtd. Both encoders share the token, position and type embeddings, so one backward pass through
   both updates the tables; the word table also serves as the generator's output layer (tied LM head).
"""

import math
from typing import NamedTuple

import numpy as np

from minielectra.backend import asnumpy, dispatch, get_xp, on_device
from minielectra.config import ElectraConfig
from minielectra.nn import init_params, zeros_like
from minielectra.nn.encoder import (EncoderDims, electra_encoder_backward, electra_encoder_forward, embeddings_shapes,
                                    encoder_shapes)
from minielectra.nn.heads import (discriminator_head_backward, discriminator_head_forward, discriminator_head_shapes,
                                  generator_head_backward, generator_head_forward, generator_head_shapes)
from minielectra.ops import checks

GEN = "generator"
DISC = "discriminator"
EMB = "discriminator.electra.embeddings"  # the shared tables live under the discriminator's name, as ELECTRA exports them
WORDS = f"{EMB}.word_embeddings.weight"


def encoder_dims(config: ElectraConfig, which):
    """The EncoderDims of the generator or the discriminator: same depth and embeddings, different widths."""
    gen = which == GEN
    return EncoderDims(
        vocab_size=config.vocab_size, embedding_size=config.embedding_size,
        hidden_size=config.generator_hidden_size if gen else config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.generator_num_attention_heads if gen else config.num_attention_heads,
        intermediate_size=config.generator_intermediate_size if gen else config.intermediate_size,
        max_positions=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps)


def param_shapes(config: ElectraConfig):
    """{name: shape} of every parameter of the generator + discriminator pair (shared embeddings counted once)."""
    g, d = encoder_dims(config, GEN), encoder_dims(config, DISC)
    return {
        **embeddings_shapes(EMB, d),
        **encoder_shapes(f"{GEN}.electra", g),
        **generator_head_shapes(GEN, g.hidden_size, config.embedding_size, config.vocab_size),
        **encoder_shapes(f"{DISC}.electra", d),
        **discriminator_head_shapes(DISC, d.hidden_size),
    }


def init_model(config: ElectraConfig, rng, dtype=np.float32):
    """Fresh parameters: truncated normal (sigma = initializer_range) weights, zero biases, unit LayerNorm gains."""
    config.validate()
    return init_params(param_shapes(config), rng, config.initializer_range, dtype)


def count_params(params):
    return sum(int(np.prod(v.shape)) for v in params.values())


class Masking(NamedTuple):
    positions: object  # (B, P) int: the picked positions, padded with 0 where weights is 0
    weights: object  # (B, P) 1.0 at real picks
    masked_ids: object  # (B, T) the generator's input: [MASK] at 85 % of the picks


def max_predictions(config: ElectraConfig, T):
    """The cap on picks per sequence, int((mask_prob + 0.005) * T) as the official code: 19 of 128."""
    return max(1, int((config.mask_prob + 0.005) * T))


def picks_per_sequence(input_ids, attention_mask, config: ElectraConfig):
    """(special (B, T) bool, k (B,)): which tokens can never be picked, and how many of each sequence's n others
    mask_tokens picks: round(mask_prob * n), at least 1, at most max_predictions and n. A function of the batch alone,
    not of the draw."""
    special = ((input_ids == config.pad_token_id) | (input_ids == config.cls_token_id)
               | (input_ids == config.sep_token_id) | (attention_mask == 0))
    n = (~special).sum(axis=1)  # (B,) candidates per sequence
    P = max_predictions(config, input_ids.shape[1])
    return special, np.minimum(n, np.clip(np.round(n * config.mask_prob).astype(np.int64), 1, P))


def mask_tokens(input_ids, attention_mask, config: ElectraConfig, rng):
    """Pick round(mask_prob * n) of each sequence's n non-special tokens (at least 1, at most max_predictions),
    uniformly without replacement; replace 85 % of the picks with [MASK] and leave the rest unchanged (no random word).
    """
    B, T = input_ids.shape
    P = max_predictions(config, T)
    special, k = picks_per_sequence(input_ids, attention_mask, config)  # k (B,) picks per sequence
    # A random key per token, pushed past every candidate's for special tokens: the first k of the argsort are a
    # uniform sample of k candidates without replacement.
    keys = rng.random((B, T)) + special * 2.0
    positions = np.argsort(keys, axis=1, kind="stable")[:, :P]  # (B, P)
    weights = (np.arange(P)[None, :] < k[:, None]).astype(np.float32)  # (B, P)
    positions = np.where(weights > 0, positions, 0)
    to_mask = (rng.random((B, P)) < 0.85) & (weights > 0)
    masked_ids = input_ids.copy()
    rows = np.broadcast_to(np.arange(B)[:, None], (B, P))
    masked_ids[rows[to_mask], positions[to_mask]] = config.mask_token_id
    return Masking(positions, weights, masked_ids)


class StepCache(NamedTuple):
    gen: object
    gen_head: object
    disc: object
    disc_head: object
    gen_rows: object  # (N,) flat indices b * T + t of the picked positions
    dmlm: object  # (N, V) dloss_mlm / dlogits
    drtd: object  # (B, T) dloss_rtd / dlogits
    shape: tuple  # (B, T, generator hidden)


class Output(NamedTuple):
    losses: dict  # loss, mlm_loss, rtd_loss (floats)
    metrics: dict  # generator/discriminator accuracies, replaced-token precision/recall, replaced fraction
    samples: object  # (N,) the generator's sampled tokens at the picked positions, to replay a step exactly
    cache: StepCache
    counts: dict  # what each mean loss divides by: mlm_loss the N picks, rtd_loss the real tokens (host floats)
    tallies: dict  # each metric as (numerator, denominator), so that shards can add theirs up (see parallel.py)


def _check_batch(batch, config):
    """The batch as host arrays, checked. Masking runs on the host (see `forward`), so a batch already on the device
    is copied down: give forward the host batch, as the trainer does, and nothing crosses back."""
    input_ids, attention_mask = (asnumpy(a) for a in batch)
    checks.int_array("input_ids", input_ids)
    checks.ndim("input_ids", input_ids, 2, "(B, T)")
    checks.shape("attention_mask", attention_mask, input_ids.shape, "(B, T) like input_ids")
    if input_ids.size and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size {config.vocab_size}): was the data tokenised with "
                         "this model's vocab?")
    return input_ids, attention_mask


def forward(params, batch, config: ElectraConfig, rng, train=True, samples=None):
    """The losses, metrics and backward cache of one ELECTRA step on batch = (input_ids (B, T), attention_mask (B, T)).

    `samples` (N,) replaces the drawn ones: a gradient check needs the discriminator's input to stay fixed while the
    generator's weights move. Each phase (masking, generator dropout, sampling, discriminator dropout) draws from its
    own Generator seeded from rng, so replaying one phase leaves the others' draws as they were, and rng advances by
    the same amount every step (which makes a resumed run continue exactly).

    On a device (params as CuPy arrays) everything runs there but the masking: it is (B, T) integer work on the host,
    where the batch comes from, and it fixes N, the number of picks that sizes the generator head, which the host
    must know. The ids, masked ids, attention mask and picked rows are then copied up (small host-to-device copies,
    which do not wait for the device); losses and metrics come back as 0-d device arrays, so nothing crosses to the
    host during the step. The Gumbel noise is computed where the logits are, from the sampling seed
    (softmax.gumbel_sample), so a device run samples the same tokens as a NumPy run of the same seed (up to exact
    ties between two tokens' noisy scores, which rounding may break the other way).
    """
    input_ids, attention_mask = _check_batch(batch, config)
    B, T = input_ids.shape
    xp = get_xp(params[WORDS])
    seeds = rng.integers(2**63, size=4)
    mask_rng, gen_rng, sample_rng, disc_rng = (np.random.default_rng(s) for s in seeds)
    m = mask_tokens(input_ids, attention_mask, config, mask_rng)
    picked = m.weights.reshape(-1) > 0
    rows = (np.arange(B)[:, None] * T + m.positions).reshape(-1)[picked]  # (N,) flat positions
    counts = {"mlm_loss": float(len(rows)), "rtd_loss": float((attention_mask != 0).sum())}  # on the host: no sync
    input_ids, attention_mask, masked_ids, rows = (xp.asarray(a) for a in (input_ids, attention_mask, m.masked_ids,
                                                                            rows))  # no-ops on the host
    types = xp.zeros_like(input_ids)
    targets = input_ids.reshape(-1)[rows]  # (N,) the original tokens

    gd = encoder_dims(config, GEN)
    gh, gen = electra_encoder_forward(params, f"{GEN}.electra", EMB, masked_ids, types, attention_mask, gd,
                                      train, gen_rng)  # (B, T, Cg)
    logits, gen_head = generator_head_forward(params, GEN, WORDS, gh.reshape(B * T, -1)[rows],
                                              config.layer_norm_eps)  # (N, V)
    mlm_loss, dmlm = dispatch("softmax_cross_entropy", logits)(logits, targets)
    if samples is None:
        samples = dispatch("gumbel_sample", logits)(logits, config.temperature, sample_rng)  # (N,): no gradient
    samples = xp.asarray(samples)
    corrupted = input_ids.copy()
    corrupted.reshape(-1)[rows] = samples
    labels = (corrupted != input_ids).astype(np.float32)  # (B, T): 1 = replaced

    dd = encoder_dims(config, DISC)
    dh, disc = electra_encoder_forward(params, f"{DISC}.electra", EMB, corrupted, types, attention_mask, dd,
                                       train, disc_rng)  # (B, T, C)
    dlogits_in, disc_head = discriminator_head_forward(params, DISC, dh)  # (B, T)
    real = (attention_mask != 0).astype(dlogits_in.dtype)
    rtd_loss, drtd = dispatch("sigmoid_cross_entropy", dlogits_in)(dlogits_in, labels, real)

    losses = {"mlm_loss": mlm_loss, "rtd_loss": rtd_loss}
    losses = {"loss": total_loss(losses, config), **losses}
    tallies = _tallies(logits, targets, dlogits_in, labels, real)
    cache = StepCache(gen, gen_head, disc, disc_head, rows, dmlm, drtd, tuple(gh.shape))
    return Output(losses, ratios(tallies), samples, cache, counts, tallies)


def counts(batch, config: ElectraConfig, samples=None):
    """forward's `counts` from the batch alone, before forward has run: the number of picks (mask_tokens' k, which
    does not depend on the draw) and of real tokens. The sharded step weighs each shard's backward with them
    (parallel.py). `samples` is forward's replay argument, which changes neither."""
    input_ids, attention_mask = _check_batch(batch, config)
    _, k = picks_per_sequence(input_ids, attention_mask, config)
    return {"mlm_loss": float(k.sum()), "rtd_loss": float((attention_mask != 0).sum())}


def total_loss(losses, config: ElectraConfig):
    """ELECTRA's loss from its two means: mlm + rtd_weight * rtd."""
    return losses["mlm_loss"] + config.rtd_weight * losses["rtd_loss"]


def _tallies(logits, targets, dlogits, labels, real):
    """Each metric's (numerator, denominator) as 0-d float64 arrays, summed where the arrays live."""
    xp = get_xp(dlogits)
    pred = dlogits > 0
    replaced = labels > 0
    real = real > 0

    def count(mask):
        return xp.asarray(mask.sum(), dtype=xp.float64)

    tp, n_real = count(pred & replaced & real), count(real)
    return {
        "gen_acc": (count(logits.argmax(axis=-1) == targets), xp.asarray(float(len(targets)))),
        "disc_acc": (count((pred == replaced) & real), n_real),
        "disc_precision": (tp, count(pred & real)),
        "disc_recall": (tp, count(replaced & real)),
        "replaced_frac": (count(replaced & real), n_real),
    }


def ratios(tallies):
    """Metrics from (numerator, denominator) tallies: Python floats for host arrays; 0-d float64 arrays on a device,
    copied to the host only when logged. A zero denominator (precision when nothing was flagged) gives 0, not NaN, so
    logs stay plain JSON."""
    metrics = {}
    for name, (a, b) in tallies.items():
        xp = get_xp(a)
        metrics[name] = xp.where(b > 0, a / xp.where(b > 0, b, 1.0), 0.0)
        if not on_device(a):
            metrics[name] = float(metrics[name])
    return metrics


def backward(output: Output, params, config: ElectraConfig, shares=None):
    """The grads dict of loss = mlm + rtd_weight * rtd, with the same keys as params.

    shares {"mlm_loss": a, "rtd_loss": b} weighs the two means: the grads of a * mlm + rtd_weight * b * rtd, a shard's
    part of a whole batch's loss (see parallel.py); None is 1 and 1."""
    c = output.cache
    shares = shares or {"mlm_loss": 1.0, "rtd_loss": 1.0}
    grads = zeros_like(params)
    drtd = c.drtd * c.drtd.dtype.type(config.rtd_weight * shares["rtd_loss"])
    ddh = discriminator_head_backward(drtd, c.disc_head, grads, DISC)
    electra_encoder_backward(ddh, c.disc, grads, f"{DISC}.electra", EMB)
    dmlm = c.dmlm if shares["mlm_loss"] == 1.0 else c.dmlm * c.dmlm.dtype.type(shares["mlm_loss"])
    dg = generator_head_backward(dmlm, c.gen_head, grads, GEN, WORDS)  # (N, Cg)
    B, T, Cg = c.shape
    dgh = get_xp(dg).zeros((B * T, Cg), dtype=dg.dtype)
    dgh[c.gen_rows] = dg  # the head ran on picked positions only; the rest get no gradient from it
    electra_encoder_backward(dgh.reshape(B, T, Cg), c.gen, grads, f"{GEN}.electra", EMB)
    return grads


def loss_and_grads(params, batch, config: ElectraConfig, rng, train=True, samples=None):
    """(losses, metrics, grads) of one ELECTRA step; see `forward` for the arguments."""
    out = forward(params, batch, config, rng, train, samples)
    return out.losses, out.metrics, backward(out, params, config)


def starting_loss(vocab_size, rtd_weight=50.0):
    """The loss of an untrained model: ln V for a uniform generator plus rtd_weight * ln 2 for a coin-flip
    discriminator (its logits start near 0)."""
    return math.log(vocab_size) + rtd_weight * math.log(2.0)
