"""JSON Lines input: one object per line, every error naming the file and line.

Hostile files end in a `DataError`, never another exception or a hang: the path must be a regular file
(a directory or a FIFO is refused before anything is read), every line must be UTF-8 and parse as a JSON
object (Python's json raises ValueError for integers of more than 4,300 digits and RecursionError for deep
nesting: both are reported as invalid JSON), no row may nest deeper than MAX_DEPTH, and no string may
hold a lone surrogate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerable.errors import DataError
from steerable.fsutil import open_regular

MAX_BYTES = 1 << 30  # a JSONL file is read whole
MAX_DEPTH = 64  # lists and objects inside one row


def read_regular_file(path: str | Path, what: str = "file") -> bytes:
    """The bytes of a regular file (fsutil.open_regular: a FIFO or a device is refused without blocking, a
    missing file or a directory is named); every problem is a DataError."""
    try:
        with open_regular(path, what, DataError) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise DataError(f"{path}: {what} is larger than {MAX_BYTES} bytes")
    return data


def _problem(value: Any, limit: int) -> str | None:
    """What is wrong with a parsed row, if anything: lists/objects nested more than `limit` levels, or a string
    (value or key) with a lone surrogate, which JSON's "\\ud800" escapes produce and UTF-8 cannot write.
    Iterative: no recursion."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "holds a string with a lone surrogate (not valid Unicode text)"
        elif isinstance(v, dict | list):
            if depth >= limit:
                return f"nests more than {limit} levels deep"
            if isinstance(v, dict):
                stack.extend((k, depth + 1) for k in v)
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def _parse_line(raw: bytes, where: str, first: bool) -> Any:
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer longer than Python's int-size limit
        raise DataError(f"{where}: not valid JSON ({str(e)[:80]})") from None


def read_jsonl_numbered(path: str | Path, what: str = "JSONL file") -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) for every non-blank line of a JSONL file; DataError names file and line."""
    path = Path(path)
    data = read_regular_file(path, what)
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, raw in enumerate(data.splitlines(), 1):
        row = _parse_line(raw, f"{path}:{n}", n == 1)
        if row is None:
            continue
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        problem = _problem(row, MAX_DEPTH)
        if problem:
            raise DataError(f"{path}:{n}: row {problem}")
        rows.append((n, row))
    return rows


def read_jsonl(path: str | Path, what: str = "JSONL file") -> list[dict[str, Any]]:
    """The rows (JSON objects) of a JSONL file, blank lines skipped."""
    return [row for _, row in read_jsonl_numbered(path, what)]
