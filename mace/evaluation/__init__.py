"""Measuring an erasure on a real model: CLIP metrics, FID and the before/after report."""
