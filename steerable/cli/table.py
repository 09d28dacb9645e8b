"""Terminal tables for the CLI: re-exported from the library module `steerable.tables`."""

from __future__ import annotations

from steerable.tables import fmt, table

__all__ = ["fmt", "table"]
