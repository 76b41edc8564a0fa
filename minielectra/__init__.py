"""minielectra: ELECTRA from scratch in NumPy, every backward pass written by hand and gradient-checked."""

__version__ = "0.1.0"
