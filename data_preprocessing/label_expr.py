"""A label made of several counts: ``--label-col like_count+comments_count``.

The expression is one column name, or column names joined by ``+``; the label is their sum.
Each named column is checked as a single label column is (``parse_count``: the table
owner's label check, a non-negative count), and the first bad cell rejects the row with
that check's reason, its detail naming the column. A table column whose own name contains
``+`` is read as that one column when the header has it (``LabelExpr.parse(text, header)``).
The artifact records ``LabelExpr.to_dict()``, and serving says what the prediction is with
``describe()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# (label, None, "") for a usable count, else (None, reason, detail): the table's label check
ParseCount = Callable[[object], tuple[float | None, str | None, str]]


@dataclass(frozen=True)
class LabelExpr:
    """The columns whose counts add up to the label, in the order written."""

    columns: tuple[str, ...]

    def __post_init__(self):
        if not self.columns or any(c == "" for c in self.columns):
            raise ValueError(f"--label-col {str(self)!r}: a column name is empty (use NAME or NAME+NAME)")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"--label-col {str(self)!r} names a column twice")

    @classmethod
    def parse(cls, text: str, header: Sequence[str] | None = None) -> "LabelExpr":
        """``"engagement"`` or ``"like_count+comments_count"`` -> an expression."""
        text = text.strip()
        if header is not None and text in header:  # a column literally named "a+b"
            return cls((text,))
        return cls(tuple(part.strip() for part in text.split("+")))

    def __str__(self) -> str:
        return "+".join(self.columns)

    @property
    def is_sum(self) -> bool:
        return len(self.columns) > 1

    def evaluate(self, cells: Mapping[str, object], parse_count: ParseCount) -> tuple[float | None, str | None, str]:
        """One row's label from its ``cells`` (column -> raw cell): ``(label, None, "")``, or
        ``(None, reason, detail)`` from the first column whose cell ``parse_count`` rejects."""
        total = 0.0
        for col in self.columns:
            value, reason, detail = parse_count(cells[col])
            if reason is not None:
                # one column: the message reads as it always has; several: say which one
                return None, reason, (f"{col}: {detail}" if self.is_sum else detail)
            total += value
        return total, None, ""

    def describe(self) -> str:
        """What the prediction is, in words (``/metadata``)."""
        if not self.is_sum:
            return f"the post's {self.columns[0]!r} count"
        return "the sum of the post's " + " + ".join(repr(c) for c in self.columns) + " counts"

    def to_dict(self) -> dict:
        return {"expression": str(self), "columns": list(self.columns), "combine": "sum",
                "description": self.describe()}
