"""Where models and data come from: pinned PyPI wheels, read as archives (never imported)."""
