"""Stable Diffusion pipelines: loading and saving diffusers folders, the built-in models, the
text encoders and cross-attention projections an erasure reads and edits, sampling."""
