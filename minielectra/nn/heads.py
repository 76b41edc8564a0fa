"""The output heads: the generator's tied masked-LM head, the discriminator's per-token head.

Names follow Hugging Face: ElectraGeneratorPredictions (`generator_predictions.dense`, `.LayerNorm`) with
`generator_lm_head` whose weight IS the word-embedding table (only its bias is a parameter of its own), and
ElectraDiscriminatorPredictions (`discriminator_predictions.dense`, `.dense_prediction`).
"""

from typing import NamedTuple

from minielectra.backend import dispatch
from minielectra.nn.encoder import dense_forward, dense_backward, norm_forward, norm_backward


def generator_head_shapes(prefix, hidden, embedding_size, vocab_size):
    return {
        f"{prefix}.generator_predictions.dense.weight": (hidden, embedding_size),
        f"{prefix}.generator_predictions.dense.bias": (embedding_size,),
        f"{prefix}.generator_predictions.LayerNorm.weight": (embedding_size,),
        f"{prefix}.generator_predictions.LayerNorm.bias": (embedding_size,),
        f"{prefix}.generator_lm_head.bias": (vocab_size,),
    }


def discriminator_head_shapes(prefix, hidden):
    return {
        f"{prefix}.discriminator_predictions.dense.weight": (hidden, hidden),
        f"{prefix}.discriminator_predictions.dense.bias": (hidden,),
        f"{prefix}.discriminator_predictions.dense_prediction.weight": (hidden, 1),
        f"{prefix}.discriminator_predictions.dense_prediction.bias": (1,),
    }


class GeneratorHeadCache(NamedTuple):
    dense: object
    gelu: object
    ln: object
    lm: object


def generator_head_forward(params, prefix, table_key, h, eps):
    """h (N, C) at the masked positions only -> vocabulary logits (N, V).

    dense (C -> E) -> GELU -> LayerNorm -> x @ table.T + bias, where table (V, E) = params[table_key] is the shared
    word-embedding table: the LM head reads words out with the same vectors the embeddings read them in with.
    """
    x, dense = dispatch("matmul_forward", h)(h, params[f"{prefix}.generator_predictions.dense.weight"])  # (N, E)
    x, gelu = dispatch("bias_gelu_forward", x)(x, params[f"{prefix}.generator_predictions.dense.bias"])
    x, ln = norm_forward(params, f"{prefix}.generator_predictions.LayerNorm", x, eps)
    logits, lm = dispatch("linear_forward", x)(x, params[table_key].T,
                                               params[f"{prefix}.generator_lm_head.bias"])  # (N, V)
    return logits, GeneratorHeadCache(dense, gelu, ln, lm)


def generator_head_backward(dlogits, cache, grads, prefix, table_key):
    """Inverts generator_head_forward -> dh (N, C); the tied table's gradient is added to the embedding's grads."""
    x, table_t = cache.lm  # the forward's linear_forward(x, table.T, bias)
    dx = dlogits @ table_t.T  # (N, E): linear_backward's dout @ W.T, with W.T = table
    # The table's gradient in the table's own (V, E) layout, dlogits.T @ x: linear_backward's x.T @ dlogits is (E, V),
    # and adding its transpose into grads walks memory across rows (2 ms of a tiny one-core step, measured).
    grads[table_key] += dlogits.T @ x
    grads[f"{prefix}.generator_lm_head.bias"] += dlogits.sum(axis=0)
    dx = norm_backward(dx, cache.ln, grads, f"{prefix}.generator_predictions.LayerNorm")
    dx, db = dispatch("bias_gelu_backward", dx)(dx, cache.gelu)
    grads[f"{prefix}.generator_predictions.dense.bias"] += db
    dh, dW = dispatch("matmul_backward", dx)(dx, cache.dense)
    grads[f"{prefix}.generator_predictions.dense.weight"] += dW
    return dh


class DiscriminatorHeadCache(NamedTuple):
    dense: object
    gelu: object
    pred: object


def discriminator_head_forward(params, prefix, h):
    """h (B, T, C) -> one logit per token (B, T): dense (C -> C) -> GELU -> dense (C -> 1). logit > 0 means 'replaced'."""
    x, dense = dispatch("matmul_forward", h)(h, params[f"{prefix}.discriminator_predictions.dense.weight"])  # (B, T, C)
    x, gelu = dispatch("bias_gelu_forward", x)(x, params[f"{prefix}.discriminator_predictions.dense.bias"])
    logits, pred = dense_forward(params, f"{prefix}.discriminator_predictions.dense_prediction", x)  # (B, T, 1)
    return logits[..., 0], DiscriminatorHeadCache(dense, gelu, pred)


def discriminator_head_backward(dlogits, cache, grads, prefix):
    """Inverts discriminator_head_forward -> dh (B, T, C)."""
    dx = dense_backward(dlogits[..., None], cache.pred, grads, f"{prefix}.discriminator_predictions.dense_prediction")
    dx, db = dispatch("bias_gelu_backward", dx)(dx, cache.gelu)
    grads[f"{prefix}.discriminator_predictions.dense.bias"] += db
    dh, dW = dispatch("matmul_backward", dx)(dx, cache.dense)
    grads[f"{prefix}.discriminator_predictions.dense.weight"] += dW
    return dh
