"""The BERT-style encoder ELECTRA's generator and discriminator are built from: embeddings, post-LN layers, the stack.

Parameter names are Hugging Face's ElectraModel names under a prefix, e.g.
`discriminator.electra.encoder.layer.0.attention.self.query.weight`. ELECTRA shares the embedding tables (and their
LayerNorm) between generator and discriminator, so `electra_encoder_forward` takes the embeddings' prefix separately
from the encoder's own.
"""

from typing import NamedTuple

from minielectra.backend import dispatch
from minielectra.ops import checks
from minielectra.ops.attention import mha_backward, mha_forward
from minielectra.ops.embedding import embedding_forward


class EncoderDims(NamedTuple):
    """The sizes and regularisation of one encoder (the generator's and the discriminator's differ)."""
    vocab_size: int
    embedding_size: int  # E, the shared tables' width
    hidden_size: int  # C
    num_layers: int
    num_heads: int  # H; head size D = C / H
    intermediate_size: int  # F
    max_positions: int
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12


def embeddings_shapes(prefix, d):
    return {
        f"{prefix}.word_embeddings.weight": (d.vocab_size, d.embedding_size),
        f"{prefix}.position_embeddings.weight": (d.max_positions, d.embedding_size),
        f"{prefix}.token_type_embeddings.weight": (d.type_vocab_size, d.embedding_size),
        f"{prefix}.LayerNorm.weight": (d.embedding_size,),
        f"{prefix}.LayerNorm.bias": (d.embedding_size,),
    }


def layer_shapes(prefix, d):
    C, F = d.hidden_size, d.intermediate_size
    shapes = {}
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        shapes[f"{prefix}.{name}.weight"] = (C, C)
        shapes[f"{prefix}.{name}.bias"] = (C,)
    shapes.update({
        f"{prefix}.attention.output.LayerNorm.weight": (C,), f"{prefix}.attention.output.LayerNorm.bias": (C,),
        f"{prefix}.intermediate.dense.weight": (C, F), f"{prefix}.intermediate.dense.bias": (F,),
        f"{prefix}.output.dense.weight": (F, C), f"{prefix}.output.dense.bias": (C,),
        f"{prefix}.output.LayerNorm.weight": (C,), f"{prefix}.output.LayerNorm.bias": (C,),
    })
    return shapes


def encoder_shapes(prefix, d):
    """Shapes of `<prefix>.embeddings_project` (only when E != C) and every `<prefix>.encoder.layer.<i>` parameter."""
    shapes = {}
    if d.embedding_size != d.hidden_size:
        shapes[f"{prefix}.embeddings_project.weight"] = (d.embedding_size, d.hidden_size)
        shapes[f"{prefix}.embeddings_project.bias"] = (d.hidden_size,)
    for i in range(d.num_layers):
        shapes.update(layer_shapes(f"{prefix}.encoder.layer.{i}", d))
    return shapes


def norm_forward(params, prefix, x, eps):
    """LayerNorm with the `<prefix>.weight` / `<prefix>.bias` parameters, through the active backend."""
    return dispatch("layernorm_forward", x)(x, params[f"{prefix}.weight"], params[f"{prefix}.bias"], eps)


def norm_backward(dout, cache, grads, prefix):
    dx, dgamma, dbeta = dispatch("layernorm_backward", dout)(dout, cache)
    grads[f"{prefix}.weight"] += dgamma
    grads[f"{prefix}.bias"] += dbeta
    return dx


def add_norm_forward(params, prefix, x, residual, d, train, rng):
    """LN(residual + dropout(x)) with the LayerNorm `<prefix>.weight` / `<prefix>.bias`: a sublayer's closing line."""
    return dispatch("dropout_add_layernorm_forward", x)(
        x, residual, params[f"{prefix}.weight"], params[f"{prefix}.bias"], d.hidden_dropout, rng, train,
        d.layer_norm_eps)


def add_norm_backward(dout, cache, grads, prefix):
    """-> (dx, dresidual) of add_norm_forward, the LayerNorm's gradients added into grads."""
    dx, dresidual, dgamma, dbeta = dispatch("dropout_add_layernorm_backward", dout)(dout, cache)
    grads[f"{prefix}.weight"] += dgamma
    grads[f"{prefix}.bias"] += dbeta
    return dx, dresidual


def dense_forward(params, prefix, x):
    """The linear layer `<prefix>.weight` (in, out) / `<prefix>.bias`."""
    return dispatch("linear_forward", x)(x, params[f"{prefix}.weight"], params[f"{prefix}.bias"])


def dense_backward(dout, cache, grads, prefix):
    dx, dW, db = dispatch("linear_backward", dout)(dout, cache)
    grads[f"{prefix}.weight"] += dW
    grads[f"{prefix}.bias"] += db
    return dx


class EmbeddingsCache(NamedTuple):
    words: object  # EmbeddingCache of the word lookup
    types: object  # EmbeddingCache of the token-type lookup
    ln: object  # NormDropoutCache of the LayerNorm and the dropout after it


def embeddings_forward(params, prefix, input_ids, token_type_ids, d, train=False, rng=None):
    """ids (B, T) -> word + position + token-type embeddings -> LayerNorm -> dropout -> (B, T, E)."""
    checks.int_array("input_ids", input_ids)
    checks.ndim("input_ids", input_ids, 2, "(B, T)")
    B, T = input_ids.shape
    if T > d.max_positions:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings {d.max_positions}")
    checks.shape("token_type_ids", token_type_ids, (B, T), "(B, T)")
    words, words_cache = embedding_forward(input_ids, params[f"{prefix}.word_embeddings.weight"])  # (B, T, E)
    types, types_cache = embedding_forward(token_type_ids, params[f"{prefix}.token_type_embeddings.weight"])
    x = words + params[f"{prefix}.position_embeddings.weight"][:T] + types  # positions broadcast over B
    x, ln = dispatch("layernorm_dropout_forward", x)(
        x, params[f"{prefix}.LayerNorm.weight"], params[f"{prefix}.LayerNorm.bias"], d.hidden_dropout, rng, train,
        d.layer_norm_eps)
    return x, EmbeddingsCache(words_cache, types_cache, ln)


def embeddings_backward(dout, cache, grads, prefix):
    """Inverts embeddings_forward; the three lookups' gradients are scatter-added into their tables."""
    dx, dgamma, dbeta = dispatch("layernorm_dropout_backward", dout)(dout, cache.ln)  # (B, T, E)
    grads[f"{prefix}.LayerNorm.weight"] += dgamma
    grads[f"{prefix}.LayerNorm.bias"] += dbeta
    embedding_backward = dispatch("embedding_backward", dx)
    grads[f"{prefix}.word_embeddings.weight"] += embedding_backward(dx, cache.words)
    grads[f"{prefix}.token_type_embeddings.weight"] += embedding_backward(dx, cache.types)
    T = dx.shape[1]
    grads[f"{prefix}.position_embeddings.weight"][:T] += dx.sum(axis=0)  # every sequence used positions 0..T-1


class LayerCache(NamedTuple):
    attn: object
    attn_ln: object  # DropoutAddNormCache: the attention output's dropout, its residual and LayerNorm
    inter: object
    gelu: object
    out: object
    out_ln: object  # DropoutAddNormCache of the FFN output


def layer_forward(params, prefix, x, mask, d, train=False, rng=None):
    """One post-LN Transformer layer, (B, T, C) -> (B, T, C):
    a = LN(x + dropout(MHA(x)));  out = LN(a + dropout(W2 gelu(W1 a + b1) + b2)).
    """
    P = lambda name: params[f"{prefix}.{name}"]  # noqa: E731
    att, attn = mha_forward(
        x, P("attention.self.query.weight"), P("attention.self.query.bias"),
        P("attention.self.key.weight"), P("attention.self.key.bias"),
        P("attention.self.value.weight"), P("attention.self.value.bias"),
        P("attention.output.dense.weight"), P("attention.output.dense.bias"),
        mask, d.num_heads, d.attention_dropout if train else 0.0, rng)  # (B, T, C)
    a, attn_ln = add_norm_forward(params, f"{prefix}.attention.output.LayerNorm", att, x, d, train, rng)
    h, inter = dispatch("matmul_forward", a)(a, P("intermediate.dense.weight"))  # (B, T, F)
    h, gelu = dispatch("bias_gelu_forward", h)(h, P("intermediate.dense.bias"))
    f, out = dense_forward(params, f"{prefix}.output.dense", h)  # (B, T, C)
    y, out_ln = add_norm_forward(params, f"{prefix}.output.LayerNorm", f, a, d, train, rng)
    return y, LayerCache(attn, attn_ln, inter, gelu, out, out_ln)


def layer_backward(dout, cache, grads, prefix):
    """Inverts layer_forward. Each residual sends its gradient down two paths, which are summed."""
    df, da_residual = add_norm_backward(dout, cache.out_ln, grads, f"{prefix}.output.LayerNorm")
    dh = dense_backward(df, cache.out, grads, f"{prefix}.output.dense")  # (B, T, F)
    dh, db1 = dispatch("bias_gelu_backward", dh)(dh, cache.gelu)
    grads[f"{prefix}.intermediate.dense.bias"] += db1
    da, dW1 = dispatch("matmul_backward", dh)(dh, cache.inter)
    grads[f"{prefix}.intermediate.dense.weight"] += dW1
    da += da_residual  # the residual a -> a + f
    datt, dx_residual = add_norm_backward(da, cache.attn_ln, grads, f"{prefix}.attention.output.LayerNorm")
    dx, *dparams = mha_backward(datt, cache.attn)
    for name, g in zip(("query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias"),
                       dparams[:6]):
        grads[f"{prefix}.attention.self.{name}"] += g
    grads[f"{prefix}.attention.output.dense.weight"] += dparams[6]
    grads[f"{prefix}.attention.output.dense.bias"] += dparams[7]
    dx += dx_residual  # the residual x -> x + att
    return dx


class EncoderCache(NamedTuple):
    emb: EmbeddingsCache
    project: object  # LinearCache of embeddings_project, None when E == C
    layers: list


def electra_encoder_forward(params, prefix, emb_prefix, input_ids, token_type_ids, mask, d, train=False, rng=None):
    """ids (B, T) -> hidden states (B, T, C): embeddings (from `emb_prefix`, maybe shared), E -> C projection, layers.

    mask (B, T) is nonzero at real tokens; padded keys get no attention.
    """
    x, emb = embeddings_forward(params, emb_prefix, input_ids, token_type_ids, d, train, rng)  # (B, T, E)
    project = None
    if d.embedding_size != d.hidden_size:
        x, project = dense_forward(params, f"{prefix}.embeddings_project", x)  # (B, T, C)
    layers = []
    for i in range(d.num_layers):
        x, c = layer_forward(params, f"{prefix}.encoder.layer.{i}", x, mask, d, train, rng)
        layers.append(c)
    return x, EncoderCache(emb, project, layers)


def electra_encoder_backward(dout, cache, grads, prefix, emb_prefix):
    """Inverts electra_encoder_forward, adding every gradient into grads (the embedding tables' included)."""
    for i in reversed(range(len(cache.layers))):
        dout = layer_backward(dout, cache.layers[i], grads, f"{prefix}.encoder.layer.{i}")
    if cache.project is not None:
        dout = dense_backward(dout, cache.project, grads, f"{prefix}.embeddings_project")
    embeddings_backward(dout, cache.emb, grads, emb_prefix)
