"""Finite-difference gradient checking: the proof that a hand-written backward matches its own forward.

Everything here runs in float64. A centred difference (f(x + h) - f(x - h)) / 2h has error O(h^2) from the Taylor
series plus O(eps / h) from rounding; with float64's eps ~ 1e-16 and h ~ 1e-5 both are ~1e-10, which leaves room to
see a relative error of 1e-9 for a correct backward and 1e-2 for a wrong one. In float32 the same rounding term is
~1e-2 and the check proves nothing.

Small tensors are checked element by element. Large ones are checked along random directions u: the directional
derivative (f(x + h u) - f(x - h u)) / 2h must equal sum(grad * u), which tests every element at once in two forward
passes. Chosen coordinates can be checked too (`numerical_grad(..., indices=...)`).
"""

from typing import NamedTuple

import numpy as np

H = 1e-5
ELEMENTWISE_MAX = 64  # tensors up to this many elements are checked entry by entry
N_DIRECTIONS = 4
TOLERANCE = 1e-6
# A gradient that is exactly zero in theory (the key bias of attention: softmax ignores a shift shared by a whole row)
# is ~1e-17 analytically and ~1e-10 numerically: relative error 1, yet both are right. When both sides are this
# close to zero the gradient is taken to be zero; anything larger must pass the relative test.
ABS_TOLERANCE = 1e-8


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||): 0 for equal arrays, 1 for unrelated ones; 0 when both are zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def _require_float64(x):
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need a float64 array, got {x.dtype}: rounding in lower precision swamps h")


def numerical_grad(f, x, h=H, indices=None):
    """Centred finite-difference gradient of the scalar f() with respect to the float64 array x, perturbed in place.

    With `indices` (flat positions in C order), only those entries are computed and returned as a 1-D array in that
    order; otherwise the full gradient with x's shape is returned. x is restored exactly after every probe. Entries
    are addressed by their multi-index, so x may be a non-contiguous view.
    """
    _require_float64(x)
    positions = range(x.size) if indices is None else indices
    out = []
    for i in positions:
        at = np.unravel_index(i, x.shape)
        old = x[at]
        x[at] = old + h
        fp = f()
        x[at] = old - h
        fm = f()
        x[at] = old
        out.append((fp - fm) / (2 * h))
    out = np.array(out, dtype=np.float64)
    return out.reshape(x.shape) if indices is None else out


def directional_grad(f, x, u, h=H):
    """(f(x + h u) - f(x - h u)) / 2h: the derivative of f along u; x is restored afterwards."""
    old = x.copy()
    x += h * u
    fp = f()
    x[...] = old - h * u
    fm = f()
    x[...] = old
    return (fp - fm) / (2 * h)


class Row(NamedTuple):
    name: str
    max_abs_diff: float
    rel_error: float
    ok: bool


def check_backward(f, x, grad, name="x", rng=None, tol=TOLERANCE):
    """Compare the analytic `grad` of the scalar f() with respect to x (float64, perturbed in place) with finite differences.

    Element-wise when x has at most ELEMENTWISE_MAX entries, else along N_DIRECTIONS random unit directions, where the
    numbers compared are the directional derivatives. ok when the relative error is at most `tol`, or when both the
    numerical and the analytic values are all below ABS_TOLERANCE (a gradient that is zero in theory). Returns a Row for the report table.
    """
    _require_float64(x)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != x.shape:
        raise ValueError(f"gradient of {name} has shape {grad.shape}, but {name} has shape {x.shape}")
    if x.size <= ELEMENTWISE_MAX:
        num, ana = numerical_grad(f, x), grad
    else:
        rng = np.random.default_rng(0) if rng is None else rng
        num, ana = [], []
        for _ in range(N_DIRECTIONS):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            num.append(directional_grad(f, x, u))
            ana.append(float(np.sum(grad * u)))
        num, ana = np.array(num), np.array(ana)
    err = rel_error(num, ana)
    zero = max(np.max(np.abs(num)), np.max(np.abs(ana))) <= ABS_TOLERANCE
    return Row(name, float(np.max(np.abs(num - ana))), err, err <= tol or bool(zero))


def check_op(forward, backward, inputs, grad_names, rng=None, tol=TOLERANCE):
    """Gradient-check an op pair against its own forward.

    forward(**inputs) -> (out, cache) and backward(dout, cache) -> one gradient per name in `grad_names`, in order.
    The scalar checked is L = sum(out * dout) for a fixed random dout, whose gradient with respect to out is dout.
    `inputs` holds float64 arrays for the names in grad_names (perturbed in place, restored) and anything else the
    forward takes. Returns one Row per name.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    out, cache = forward(**inputs)
    dout = rng.standard_normal(np.shape(out))
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(grad_names):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(grad_names)} names {grad_names}")

    def loss():
        return float(np.sum(forward(**inputs)[0] * dout))

    return [check_backward(loss, inputs[n], g, n, rng, tol) for n, g in zip(grad_names, grads)]


def format_table(rows, title=None):
    """The report table: name | max abs diff | rel error | ok, one line per Row."""
    width = max([len(r.name) for r in rows] + [4])
    lines = [] if title is None else [title]
    lines.append(f"{'name':<{width}}  {'max abs diff':>12}  {'rel error':>9}  ok")
    lines.append("-" * (width + 31))
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.max_abs_diff:>12.2e}  {r.rel_error:>9.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


# ---- the report `minielectra gradcheck` prints ------------------------------------------------------------------------


def _op_rows(rng):
    """Gradient checks of every reference op, on small float64 inputs with a padded sequence and dropout on."""
    from minielectra.ops import activations, attention, dropout, embedding, layernorm, linear, lstm, softmax

    def r(*shape):
        return rng.standard_normal(shape)

    B, T, C, H = 2, 5, 4, 2
    mask = np.ones((B, T))
    mask[1, 3:] = 0  # the second sequence ends in two pads
    bool_mask = (mask != 0)[:, None, :]  # (B, 1, T): softmax over keys
    sections = [
        ("linear", linear.linear_forward, linear.linear_backward, dict(x=r(B, T, C), W=r(C, 3), b=r(3)), ["x", "W", "b"]),
        ("gelu", activations.gelu_forward, activations.gelu_backward, dict(x=3 * r(B, T, C)), ["x"]),
        ("gelu tanh", lambda x: activations.gelu_forward(x, approximate=True), activations.gelu_backward,
         dict(x=3 * r(B, T, C)), ["x"]),
        ("bias_gelu", activations.bias_gelu_forward, activations.bias_gelu_backward, dict(x=r(B, T, C), b=r(C)),
         ["x", "b"]),
        ("dropout", lambda x: dropout.dropout_forward(x, 0.3, np.random.default_rng(1)), dropout.dropout_backward,
         dict(x=r(B, T, C)), ["x"]),
        ("softmax", lambda x: softmax.softmax_forward(x, bool_mask), softmax.softmax_backward, dict(x=r(B, T, T)),
         ["x"]),
        ("log_softmax", lambda x: softmax.log_softmax_forward(x, bool_mask), softmax.log_softmax_backward,
         dict(x=r(B, T, T)), ["x"]),
        ("layernorm", layernorm.layernorm_forward, layernorm.layernorm_backward,
         dict(x=r(B, T, C), gamma=r(C), beta=r(C)), ["x", "gamma", "beta"]),
        ("dropout_add_layernorm",
         lambda x, residual, gamma, beta: layernorm.dropout_add_layernorm_forward(x, residual, gamma, beta, 0.3,
                                                                                 np.random.default_rng(4)),
         layernorm.dropout_add_layernorm_backward, dict(x=r(B, T, C), residual=r(B, T, C), gamma=r(C), beta=r(C)),
         ["x", "residual", "gamma", "beta"]),
        ("layernorm_dropout",
         lambda x, gamma, beta: layernorm.layernorm_dropout_forward(x, gamma, beta, 0.3, np.random.default_rng(5)),
         layernorm.layernorm_dropout_backward, dict(x=r(B, T, C), gamma=r(C), beta=r(C)), ["x", "gamma", "beta"]),
        ("embedding", embedding.embedding_forward, embedding.embedding_backward,
         dict(ids=np.array([[1, 2, 1], [0, 1, 3]]), table=r(4, C)), ["table"]),
        ("attention", lambda q, k, v: attention.attention_forward(q, k, v, mask, 0.1, np.random.default_rng(2)),
         attention.attention_backward, dict(q=r(B, H, T, 3), k=r(B, H, T, 3), v=r(B, H, T, 3)), ["q", "k", "v"]),
        ("mha", lambda **a: attention.mha_forward(mask=mask, n_heads=H, p_drop=0.1, rng=np.random.default_rng(3), **a),
         attention.mha_backward,
         dict(x=r(B, T, C), **{f"{w}{n}": r(C, C) if w == "W" else r(C) for n in "qkvo" for w in "Wb"}),
         ["x", "Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"]),
        ("lstm", lambda **a: lstm.lstm_forward(mask=mask, return_sequences=True, **a), lstm.lstm_backward,
         dict(x=r(B, T, C), Wx=r(C, 4 * H), Wh=r(H, 4 * H), b=r(4 * H)), ["x", "Wx", "Wh", "b"]),
    ]
    rows = []
    for title, fwd, bwd, inputs, names in sections:
        rows += [row._replace(name=f"{title}: {row.name}") for row in check_op(fwd, bwd, inputs, names, rng)]
    return rows


def _loss_rows(rng):
    from minielectra.ops.losses import sigmoid_cross_entropy, softmax_cross_entropy

    logits, targets, w = rng.standard_normal((6, 7)), rng.integers(0, 7, 6), rng.random(6)
    z, y, wz = rng.standard_normal((2, 5)), rng.integers(0, 2, (2, 5)), rng.random((2, 5))
    return [
        check_backward(lambda: softmax_cross_entropy(logits, targets, w)[0], logits,
                       softmax_cross_entropy(logits, targets, w)[1], "softmax_cross_entropy: logits"),
        check_backward(lambda: sigmoid_cross_entropy(z, y, wz)[0], z, sigmoid_cross_entropy(z, y, wz)[1],
                       "sigmoid_cross_entropy: logits"),
    ]


def _model_rows(rng):
    """The whole ELECTRA model (generator + discriminator, 2 layers, dropout on): every parameter."""
    from minielectra import electra
    from minielectra.config import ElectraConfig

    config = ElectraConfig(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=12, generator_hidden_size=4, generator_num_attention_heads=1,
                           generator_intermediate_size=8, max_position_embeddings=16, mask_prob=0.3)
    params = electra.init_model(config, np.random.default_rng(0), np.float64)
    for k in params:
        params[k] += rng.standard_normal(params[k].shape) * 0.3
    ids = rng.integers(5, 23, (3, 9))
    ids[:, 0], ids[:, -1] = config.cls_token_id, config.sep_token_id
    mask = np.ones_like(ids)
    ids[2, 6:], mask[2, 6:] = config.pad_token_id, 0
    out = electra.forward(params, (ids, mask), config, np.random.default_rng(7))
    grads = electra.backward(out, params, config)

    def loss():
        return electra.forward(params, (ids, mask), config, np.random.default_rng(7), samples=out.samples).losses["loss"]

    return [check_backward(loss, params[k], grads[k], f"electra: {k}", rng) for k in sorted(params)]


def run_report(print_fn=print):
    """Gradient-check every op, the losses and the whole ELECTRA model; print the table; True if all pass."""
    rng = np.random.default_rng(0)
    rows = _op_rows(rng) + _loss_rows(rng) + _model_rows(rng)
    print_fn(format_table(rows, title="float64 centred differences, h = 1e-5, tolerance 1e-6 (relative)"))
    failed = [r.name for r in rows if not r.ok]
    print_fn(f"{len(rows) - len(failed)} of {len(rows)} gradients pass" + (f"; FAILED: {', '.join(failed)}" if failed
                                                                           else ""))
    return not failed
