"""mmgen: one autoregressive transformer over interleaved text and image tokens."""
