"""Estimate steering directions from captured statistics, measure their quality, store them."""
