"""Small utilities shared across the package (FLOP counting, ...)."""
