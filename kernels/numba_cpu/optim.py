"""Numba kernel for `minielectra.optim.adamw_step`: the whole AdamW update of one tensor in a single pass.

The reference makes ~8 passes over memory per parameter (scale g, update m, update v, sqrt, divide, decay, step) with
a temporary for each; here every element is read once and m, v and the parameter are written once, with the clipping
scale and the decay mask folded in. Same arithmetic, in float32 for float32 params, as the reference.
"""

import numpy as np
from numba import njit, prange

from minielectra.optim import _check_matching, no_decay


@njit(cache=True, parallel=True, nogil=True)
def _adamw_flat(p, g, m, v, lr, grad_scale, b1, c1, b2, c2, eps, wd):
    for i in prange(p.size):  # each iteration owns element i
        gi = g[i] * grad_scale
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
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
        b1, b2 = config.adam_beta1, config.adam_beta2
        # 1 - beta is formed in float64 and rounded once, as the reference's Python scalars are: 1 - float32(0.999)
        # would be off by 1e-5 relative.
        _adamw_flat(p.reshape(-1), g.reshape(-1), state.m[k].reshape(-1), state.v[k].reshape(-1), t(lr),
                    t(grad_scale), t(b1), t(1 - b1), t(b2), t(1 - b2), t(config.adam_epsilon), t(wd))
    state.step += 1
