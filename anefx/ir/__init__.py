"""Layer 1, the canonical IR: ATen FX graphs with shape metadata, how models become one, errors."""
