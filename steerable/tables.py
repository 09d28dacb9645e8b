"""Plain aligned tables for the terminal (no dependency, copy-pasteable): library code that returns text (e.g.
`directions.summary`) and the CLI both use them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(x: object, digits: int = 3) -> str:
    """A float with `digits` decimals ("—" for NaN); anything else as str()."""
    if isinstance(x, float):
        return "—" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns under a header line and a rule."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("─" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


__all__ = ["fmt", "table"]
