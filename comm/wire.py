"""Wire format: many per-row fields of different dtypes packed into ONE uint8 row, so a dispatch is a single
all-to-all carrying data and metadata together.

    fields {name: [N, width] tensor of its dtype} --view as bytes, concat--> [N, B] uint8 --a2a--> unpack

Legend: N rows, B bytes per row, D hidden size, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RowCodec:
    """A fixed row layout. ``pack`` and ``unpack`` are exact inverses (bit-for-bit)."""

    fields: tuple[Field, ...]

    @property
    def row_bytes(self) -> int:
        return sum(f.nbytes for f in self.fields)

    def pack(self, device: torch.device, **values: torch.Tensor) -> torch.Tensor:
        names = {f.name for f in self.fields}
        if set(values) != names:
            raise ValueError(f"pack needs fields {sorted(names)}, got {sorted(values)}")
        n = next(iter(values.values())).shape[0]
        parts = []
        for f in self.fields:
            v = values[f.name]
            if v.shape != (n, f.width):
                raise ValueError(f"field {f.name}: expected [{n}, {f.width}], got {tuple(v.shape)}")
            flat = v.to(device=device, dtype=f.dtype).reshape(-1).contiguous()   # (a [N, 1] view may have stride 0)
            parts.append(flat.view(torch.uint8).reshape(n, f.nbytes))
        if not parts:
            return torch.empty((n, 0), dtype=torch.uint8, device=device)
        return torch.cat(parts, dim=1)

    def unpack(self, rows_NB: torch.Tensor) -> dict[str, torch.Tensor]:
        if rows_NB.dtype != torch.uint8 or rows_NB.ndim != 2 or rows_NB.shape[1] != self.row_bytes:
            raise ValueError(f"expected uint8 rows of {self.row_bytes} bytes, got {rows_NB.dtype} "
                             f"{tuple(rows_NB.shape)}")
        out, start = {}, 0
        for f in self.fields:
            chunk = rows_NB[:, start:start + f.nbytes].contiguous()
            out[f.name] = chunk.view(f.dtype).reshape(rows_NB.shape[0], f.width)
            start += f.nbytes
        return out


def dispatch_codec(hidden_size: int, top_k: int, dtype: torch.dtype) -> RowCodec:
    """One dispatched token: its residual hidden state, its router choices, the rank the SOURCE chose for each
    choice (with replicated experts another holder must not compute it too: placement/replicas.py), its
    step-local index and the rank that will sum its expert outputs (its anchor)."""
    return RowCodec((Field("x", dtype, hidden_size), Field("topk_ids", torch.int32, top_k),
                     Field("topk_weights", torch.float32, top_k), Field("ranks", torch.int32, top_k),
                     Field("token", torch.int32, 1), Field("anchor", torch.int32, 1)))


def combine_codec(hidden_size: int, dtype: torch.dtype) -> RowCodec:
    """One partial output on its way to be summed: the token it belongs to and the partial weighted sum."""
    return RowCodec((Field("token", torch.int32, 1), Field("y", dtype, hidden_size)))


def field_offset(codec: RowCodec, name: str) -> tuple[int, int]:
    """(first byte, bytes) of a field inside a packed row."""
    start = 0
    for f in codec.fields:
        if f.name == name:
            return start, f.nbytes
        start += f.nbytes
    raise KeyError(name)
