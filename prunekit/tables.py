"""Fixed-width text tables: the one renderer of scan tables, sparsity reports and compaction reports.

Example:
    >>> lines, rule = format_table([["layer", "params"], ["conv", "1,024"]])
    >>> print("\\n".join([lines[0], rule, *lines[1:]]))
    layer  params
    -----  ------
    conv    1,024
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[object]], left: int = 1) -> Tuple[List[str], str]:
    """Each row as one line, columns two spaces apart, and a rule line of dashes as wide as the columns.

    Args:
        rows: the header first, then the rows; every row has the same number of cells.
        left: how many leading columns are left-aligned (names); the rest are right-aligned (numbers).
    """
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(cell.ljust(width) if i < left else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in cells
    ]
    return lines, "  ".join("-" * width for width in widths)
