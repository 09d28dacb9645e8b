"""JSON Lines input: one object per line, every error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerable.errors import DataError


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows
