"""The NumPy reference: every op as a pure (out, cache) = forward(...) / grads = backward(dout, cache) pair.

Written against `xp` (numpy or cupy, whichever owns the inputs), so the same code runs on both. Kernels in
`kernels/` replace the hot ones and are tested against these.
"""
