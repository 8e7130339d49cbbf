"""First-fit packing of variable-length examples into a fixed number of fixed-length rows.

Each row follows the batch schema (data/schema.py): examples keep their own segment id,
so attention never crosses them (kernels/mask.py), and positions restart per example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mmgen.data.schema import FIELDS, check_no_loss_in_spans, pack_row


def first_fit(lengths: Sequence[int], num_rows: int, row_len: int) -> tuple[list[list[int]],
                                                                            list[int]]:
    """First-fit decreasing: example indices per row, and the indices that fit nowhere.

    Longest first, each into the first row with room; ties keep input order, so the
    result is a pure function of the lengths. Dropped examples are the ones that would
    overflow every row (including any longer than a row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = [row_len] * num_rows
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    dropped = []
    for i in order:
        n = lengths[i]
        for r in range(num_rows):
            if n <= free[r]:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            dropped.append(i)
    for r in rows:  # keep the stream order inside a row (the order is not semantic)
        r.sort()
    return rows, sorted(dropped)


@dataclasses.dataclass
class PackStats:
    examples: int = 0     # examples offered
    packed: int = 0       # examples placed in rows
    dropped: int = 0      # examples that fit no row
    tokens: int = 0       # non-pad tokens
    capacity: int = 0     # rows x row length

    @property
    def efficiency(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0

    def add(self, other: PackStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def pack(examples: Sequence[dict[str, np.ndarray]], num_rows: int, row_len: int,
         pad_id: int) -> tuple[dict[str, np.ndarray], PackStats]:
    """Packs examples (dicts of per-token arrays, data/schema.py) into [num_rows, row_len]
    arrays; rows left empty are all padding (segment id 0, no loss)."""
    lengths = [len(ex["tokens"]) for ex in examples]
    rows, dropped = first_fit(lengths, num_rows, row_len)
    packed = []
    for members in rows:
        row = pack_row([examples[i] for i in members], row_len, pad_id)
        check_no_loss_in_spans(row)
        packed.append(row)
    batch = {f: np.stack([r[f] for r in packed]) for f in FIELDS}
    used = sum(lengths) - sum(lengths[i] for i in dropped)
    stats = PackStats(examples=len(examples), packed=len(examples) - len(dropped),
                      dropped=len(dropped), tokens=used, capacity=num_rows * row_len)
    return batch, stats
