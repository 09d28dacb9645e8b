"""Sweeps: measure a grid of steering configurations, pick an operating point, report it."""
