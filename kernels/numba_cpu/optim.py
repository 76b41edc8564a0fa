"""Numba kernel for `minielectra.optim.adamw_step`: the whole AdamW update of one tensor in a single pass.

The reference makes ~8 passes over memory per parameter (scale g, update m, update v, sqrt, divide, decay, step) with
a temporary for each; here every element is read once and m, v and the parameter are written once, with the clipping
scale and the decay mask folded in. Same arithmetic, in float32 for float32 params, as the reference.
"""

import numpy as np
from numba import njit, prange

from minielectra.optim import _check_matching, no_decay


@njit(cache=True, parallel=True)
def _adamw_flat(p, g, m, v, lr, grad_scale, b1, b2, eps, wd):
    one = p.dtype.type(1.0)
    for i in prange(p.size):  # each iteration owns element i
        gi = g[i] * grad_scale
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * (gi * gi)
        m[i] = mi
        v[i] = vi
        update = mi / (np.sqrt(vi) + eps) + wd * p[i]
        p[i] = p[i] - lr * update


def adamw_step(params, grads, state, lr, config, grad_scale=1.0):
    """Same contract as minielectra.optim.adamw_step: params, state.m, state.v updated in place, state.step += 1."""
    _check_matching(params, grads, state)
    for k, p in params.items():
        if not (p.flags.c_contiguous and state.m[k].flags.c_contiguous and state.v[k].flags.c_contiguous):
            raise ValueError(f"adamw_step kernel updates in place and needs C-contiguous arrays; {k} is not")
        t = p.dtype.type
        g = np.ascontiguousarray(grads[k], dtype=p.dtype)
        wd = 0.0 if no_decay(k) else config.weight_decay
        _adamw_flat(p.reshape(-1), g.reshape(-1), state.m[k].reshape(-1), state.v[k].reshape(-1), t(lr),
                    t(grad_scale), t(config.adam_beta1), t(config.adam_beta2), t(config.adam_epsilon), t(wd))
    state.step += 1
