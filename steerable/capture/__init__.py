"""Capture activations at hook sites and token positions, streamed into per-class statistics."""
