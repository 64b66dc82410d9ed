"""Layer 2, analyses over the IR: the (B, C, 1, S) layout vocabulary, attention heads, masks, legalization."""
