"""LSTM over a padded batch, and its backward pass: backpropagation through time.

One step (Hochreiter & Schmidhuber 1997 with the forget gate of Gers et al. 2000; the gate order i, f, g, o is
PyTorch's):

    a = x_t @ Wx + h_{t-1} @ Wh + b                  (B, 4H) the four gates' pre-activations side by side
    i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o);  g = tanh(a_g)
    c~ = f * c_{t-1} + i * g                         the cell: forget some of the old, write some of the new
    h~ = o * tanh(c~)
    (c_t, h_t) = (c~, h~) where mask[:, t] else (c_{t-1}, h_{t-1})

A padded step keeps the previous state, so h_T is the state after each row's last real token wherever the padding
sits, and a row that is all padding ends in the initial state h_0 = c_0 = 0. sigmoid(z) is computed as
(1 + tanh(z / 2)) / 2, which is exact and never overflows (exp(-z) would at z = -1000).

The backward walks the steps in reverse, carrying dh and dc from step t + 1 to step t; the gates' gradients of
all steps are gathered so that dx, dWx, dWh and db each come out of one matrix product at the end.
"""

from typing import NamedTuple

from minielectra.backend import get_xp
from minielectra.ops import checks


class LSTMCache(NamedTuple):
    x: object  # (B, T, E) the input, for dWx
    keep: object  # (B, T, 1) bool: True at real tokens
    Wx: object  # (E, 4H) for dx
    Wh: object  # (H, 4H) for dh_{t-1}
    h: object  # (B, T + 1, H) the states, h[:, 0] = 0: h[:, t] is step t's h_{t-1}
    c: object  # (B, T + 1, H) the cells, likewise
    gates: object  # (B, T, 4H) i, f, g, o after their activations
    tanh_c: object  # (B, T, H) tanh(c~) of each step's candidate cell (c~ differs from c_t at a padded step)
    return_sequences: bool


def _sigmoid(xp, z):
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def lstm_forward(x, mask, Wx, Wh, b, return_sequences=False):
    """x (B, T, E), mask (B, T) (nonzero = real token), Wx (E, 4H), Wh (H, 4H), b (4H,) -> h_T (B, H), or every
    step's state (B, T, H) with return_sequences=True."""
    checks.float_array("x", x)
    checks.ndim("x", x, 3, "(B, T, E)")
    B, T, E = x.shape
    checks.ndim("Wh", Wh, 2, "(H, 4H)")
    H = Wh.shape[0]
    checks.param("Wh", Wh, (H, 4 * H), "(H, 4H)")
    checks.param("Wx", Wx, (E, 4 * H), "(E, 4H) with E = x.shape[-1]")
    checks.param("b", b, (4 * H,), "(4H,)")
    checks.shape("mask", mask, (B, T), "(B, T) like x's first two axes")
    xp = get_xp(x)
    keep = (mask != 0)[:, :, None]  # (B, T, 1)
    xw = (x.reshape(-1, E) @ Wx + b).reshape(B, T, 4 * H)  # the input's share of every step's gates, in one GEMM
    h = xp.zeros((B, T + 1, H), dtype=x.dtype)
    c = xp.zeros((B, T + 1, H), dtype=x.dtype)
    gates = xp.empty((B, T, 4 * H), dtype=x.dtype)
    tanh_c = xp.empty((B, T, H), dtype=x.dtype)
    for t in range(T):
        a = xw[:, t] + h[:, t] @ Wh  # (B, 4H)
        g = gates[:, t]
        g[:, :2 * H] = _sigmoid(xp, a[:, :2 * H])  # i, f
        g[:, 2 * H:3 * H] = xp.tanh(a[:, 2 * H:3 * H])  # g
        g[:, 3 * H:] = _sigmoid(xp, a[:, 3 * H:])  # o
        i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
        cn = f * c[:, t] + i * gg  # (B, H)
        tanh_c[:, t] = xp.tanh(cn)
        c[:, t + 1] = xp.where(keep[:, t], cn, c[:, t])
        h[:, t + 1] = xp.where(keep[:, t], o * tanh_c[:, t], h[:, t])
    out = h[:, 1:] if return_sequences else h[:, T]
    return out, LSTMCache(x, keep, Wx, Wh, h, c, gates, tanh_c, return_sequences)


def lstm_backward(dout, cache):
    """Inverts lstm_forward by backpropagation through time -> (dx, dWx, dWh, db)."""
    x, keep, Wx, Wh, h, c, gates, tanh_c, return_sequences = cache
    xp = get_xp(dout)
    B, T, E = x.shape
    H = Wh.shape[0]
    da = xp.zeros((B, T, 4 * H), dtype=dout.dtype)  # dloss / da for every step
    dh_next = xp.zeros((B, H), dtype=dout.dtype) if return_sequences else dout  # out = h_T: its gradient enters at T
    dc_next = xp.zeros((B, H), dtype=dout.dtype)
    for t in reversed(range(T)):
        dh = dh_next + dout[:, t] if return_sequences else dh_next  # out[:, t] = h_{t+1} also feeds step t + 1
        m = keep[:, t]
        i, f, g, o = gates[:, t, :H], gates[:, t, H:2 * H], gates[:, t, 2 * H:3 * H], gates[:, t, 3 * H:]
        tc = tanh_c[:, t]
        # `h_t, c_t = where(keep, (h~, c~), (h_{t-1}, c_{t-1}))`: a padded step routes dh and dc straight through
        dhn = xp.where(m, dh, 0.0)
        dcn = xp.where(m, dc_next, 0.0) + dhn * o * (1.0 - tc * tc)  # h~ = o * tanh(c~)
        dat = da[:, t]
        dat[:, :H] = dcn * g * i * (1.0 - i)  # c~ = f * c_{t-1} + i * g; i = sigmoid(a_i)
        dat[:, H:2 * H] = dcn * c[:, t] * f * (1.0 - f)
        dat[:, 2 * H:3 * H] = dcn * i * (1.0 - g * g)  # g = tanh(a_g)
        dat[:, 3 * H:] = dhn * tc * o * (1.0 - o)
        dc_next = xp.where(m, dcn * f, dc_next)
        dh_next = xp.where(m, dat @ Wh.T, dh)  # a = x_t @ Wx + h_{t-1} @ Wh + b
    dx = (da.reshape(-1, 4 * H) @ Wx.T).reshape(B, T, E)  # (B, T, E)
    dWx = x.reshape(-1, E).T @ da.reshape(-1, 4 * H)  # (E, 4H)
    dWh = h[:, :T].reshape(-1, H).T @ da.reshape(-1, 4 * H)  # (H, 4H): step t multiplied h_{t-1} = h[:, t]
    db = da.reshape(-1, 4 * H).sum(axis=0)
    return dx, dWx, dWh, db
