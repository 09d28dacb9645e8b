"""Data sets: built-in (from pinned wheels, with fixed splits) and JSONL files."""

from steerable.data.loaders import Example, contrastive_examples, load_pairs, load_prompts

__all__ = ["Example", "contrastive_examples", "load_pairs", "load_prompts"]
