"""How every generated document writes a figure and a table (report.md, results.md, questions.md): a leaf
module, so that the modules measuring a figure can also write its rows without importing a document writer."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(x: float | None, digits: int = 4) -> str:
    """How report.md (and results.md) write a figure: ``digits`` decimals, or ``n/a`` for missing / nan."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def json_safe(obj):
    """nan/inf become None (strict JSON), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines; a ``|`` or newline inside a cell is escaped so it cannot break the row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
