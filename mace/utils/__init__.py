"""Plumbing: atomic writes, fingerprints of settings and files, concept names as data, images,
the offline CLIP tokenizer and seeded sampling."""
