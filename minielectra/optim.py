"""AdamW over (params, grads) dicts, warmup + linear decay, global-norm clipping.

The update is ELECTRA's official optimizer, `AdamWeightDecayOptimizer` in google-research/electra optimization.py
(the same as BERT's), followed exactly:

    m      = b1 * m + (1 - b1) * g
    v      = b2 * v + (1 - b2) * g * g
    update = m / (sqrt(v) + eps)
    update += weight_decay * param          # only for decayed parameters
    param -= lr * update

Two things differ from textbook Adam / PyTorch AdamW, and both are deliberate, because they are what the published
ELECTRA numbers were trained with:
- No bias correction. Adam divides m by (1 - b1^t) and v by (1 - b2^t) so that the first steps are not shrunk towards
  zero; BERT and ELECTRA leave it out and rely on the learning-rate warmup to make those first steps small anyway.
- Weight decay is decoupled (added to the update, not to the gradient, so it never enters m and v) and is multiplied
  by the learning rate, so it fades with the schedule.

Everything is written against `xp`, the array module of the parameters, so the same code updates NumPy and CuPy arrays
in place.
"""

import functools
import math
from dataclasses import dataclass

from minielectra import flat
from minielectra.backend import get_xp, on_device
from minielectra.nn import zeros_like

# The official exclude list: biases and LayerNorm weights are not decayed. Shrinking a bias or a LayerNorm gain towards
# zero does not make the model simpler in any useful sense; it only fights the normalisation.
NO_DECAY_MARKERS = ("LayerNorm", "layer_norm")


@functools.lru_cache(maxsize=None)  # asked for every parameter on every step
def no_decay(name):
    """True when the parameter called `name` is excluded from weight decay: a LayerNorm weight or bias, or any bias.

    The official code searches for 'bias' anywhere in the name; with Hugging Face state_dict names that is the same as
    the name ending in 'bias', which is the safer test (it cannot catch a future name like 'bias_scale.weight').
    """
    return any(marker in name for marker in NO_DECAY_MARKERS) or name.endswith("bias")


@dataclass
class AdamWState:
    """Adam's running moments, one array per parameter, and the number of updates applied so far."""

    m: dict  # first moment: exponential moving average of g
    v: dict  # second moment: exponential moving average of g * g
    step: int = 0


def adamw_init(params):
    """A fresh AdamWState: zero moments with each parameter's shape, dtype and array module (NumPy or CuPy), laid out
    as the params when they are views of one buffer (see flatten)."""
    return AdamWState(m=zeros_like(params), v=zeros_like(params), step=0)


def flatten(params, state=None):
    """(params, state) as views of one buffer each, laid out alike (flat.py): the decayed params first, then the
    others, so the Numba kernels update them all in one call with the decay mask as one boundary. Copies; state None
    gives None."""
    layout = flat.layout_of(params, no_decay)
    params = flat.flatten(params, layout)
    if state is not None:
        state.m, state.v = flat.flatten(state.m, layout), flat.flatten(state.v, layout)
    return params, state


def _check_matching(params, grads, state):
    """Raise a ValueError naming every key or shape on which grads / state.m / state.v disagree with params.

    Without this check a missing gradient would be a KeyError deep in the loop, and a gradient of the wrong shape
    could broadcast silently into the moments.
    """
    others = (grads, state.m, state.v)
    if all(len(o) == len(params) for o in others) and all(
            k in o and o[k].shape == p.shape for k, p in params.items() for o in others):
        return  # the usual case, found without building the sets below (every step runs this)
    problems = []
    for what, other in (("grads", grads), ("state.m", state.m), ("state.v", state.v)):
        missing = sorted(set(params) - set(other))
        unknown = sorted(set(other) - set(params))
        if missing:
            problems.append(f"{what} lacks {', '.join(missing)}")
        if unknown:
            problems.append(f"{what} has keys that are not params: {', '.join(unknown)}")
        problems += [f"{what}[{k!r}] has shape {other[k].shape} but the param has {params[k].shape}"
                     for k in sorted(set(params) & set(other)) if other[k].shape != params[k].shape]
    if problems:
        raise ValueError("adamw_step needs grads and optimizer state for exactly the params' keys and shapes: "
                         + "; ".join(problems)
                         + ". Compute grads for every param, and build the state with adamw_init(params).")


def clip_scale(grads, max_norm):
    """(global_norm, scale): the L2 norm of all gradients together, and the factor that brings it down to max_norm.

    As the official tf.clip_by_global_norm: scale = max_norm / max(norm, max_norm), i.e. min(1, max_norm / norm), so
    gradients below the limit are untouched (a zero norm gives scale 1). The squares are summed in float64 because a
    float32 sum over millions of entries loses digits. The scale is not applied here: pass it to adamw_step as
    grad_scale, which folds it into the update instead of rewriting every gradient first.

    A non-finite norm (an inf or NaN gradient) is returned as it is, with a NaN scale, as TensorFlow's clipping gives;
    the caller must check math.isfinite(global_norm) and decide (the trainer stops with a message).

    For device gradients both are 0-d float64 device arrays, computed there (adamw_step takes the scale as it is):
    the norm reaches the host only with the metrics it is logged with.
    """
    # Sum on the device and transfer once at the end: float() per tensor would synchronise a GPU once per parameter.
    # Sorted keys: a float sum depends on its order, and a resumed run's dict (read from a checkpoint) may be ordered
    # differently from a fresh one's; the same order keeps a resumed run bit-identical.
    total = 0.0
    for k in sorted(grads):
        g = grads[k]
        xp = get_xp(g)
        total = total + xp.sum(xp.square(g.astype(xp.float64)))
    return norm_and_scale(total, max_norm)


def norm_and_scale(total, max_norm):
    """clip_scale's (global_norm, scale) from the sum of the squared gradients, a float or a 0-d device array."""
    if on_device(total):
        xp = get_xp(total)
        norm = xp.sqrt(total)
        scale = xp.where(norm <= max_norm, 1.0, max_norm / norm)
        return norm, xp.where(xp.isfinite(norm), scale, xp.nan)
    norm = math.sqrt(float(total))
    if not math.isfinite(norm):
        return norm, math.nan
    return norm, 1.0 if norm <= max_norm else max_norm / norm


def adamw_step(params, grads, state, lr, config, grad_scale=1.0):
    """One AdamW update of every parameter, in place; state.m, state.v and state.step are updated in place too.

    `config` is a TrainConfig (adam_beta1, adam_beta2, adam_epsilon, weight_decay); `lr` is this step's learning rate
    (see learning_rate). The gradient used is grads[k] * grad_scale, so clipping costs no extra pass over the grads;
    grad_scale may be a 0-d device array (clip_scale's on a device), used without a transfer.
    """
    _check_matching(params, grads, state)
    b1, b2, eps, wd = config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay
    # Python floats, not NumPy float64 scalars: under NumPy's promotion rules a float64 scalar would turn every
    # float32 intermediate below into float64 (slower, and rounded differently from a float32 run).
    lr = float(lr)
    if not on_device(grad_scale):
        grad_scale = float(grad_scale)
    for k, p in params.items():
        xp = get_xp(p)
        # A device scale is rounded to the param's dtype first, as NumPy rounds a Python float scalar: same result.
        g = grads[k] * (grad_scale if isinstance(grad_scale, float) else grad_scale.astype(p.dtype))
        m, v = state.m[k], state.v[k]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        update = m / (xp.sqrt(v) + eps)
        if wd and not no_decay(k):
            update += wd * p
        p -= lr * update
    state.step += 1


def learning_rate(step, config):
    """The learning rate for the update with 0-based index `step`: linear warmup, then linear decay to 0.

        step >= steps:  0                                the run is over
        step < warmup:  base * (step + 1) / warmup       ramps up to exactly `base` at the last warmup update
        otherwise:      base * (steps - step) / (steps - warmup)

    base = config.learning_rate, warmup = config.warmup_steps (0: no warmup, start at base), steps = config.steps.
    Counting from step + 1 makes the very first update use base / warmup rather than 0, so no update is wasted. The
    official code multiplies a decay over all steps, base * (1 - step / steps), by the ramp min(1, step / warmup);
    with warmup much smaller than steps the two schedules are nearly the same curve.
    """
    base, warmup, steps = config.learning_rate, config.warmup_steps, config.steps
    if step >= steps:  # past the end; checked first so that warmup >= steps cannot divide by zero below
        return 0.0
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (steps - step) / (steps - warmup)
