"""Many photos decoded and preprocessed in DataLoader worker processes: (key, path) pairs in,
batches of tensors out; unreadable files come out as errors beside the batch and never stop
the stream (a run over millions of photos meets a few broken ones)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fashionlens.data.images import ImageError, open_image


class _Decode(Dataset):
    def __init__(self, rows: Sequence[tuple[object, str]], preprocess):
        self.rows, self.preprocess = rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        key, path = self.rows[i]
        try:
            img = open_image(path, draft_size=self.preprocess.size)
            return key, self.preprocess(img), None
        except ImageError as exc:
            return key, None, str(exc)
        except Exception as exc:  # a codec bug must not end a run of millions of images
            return key, None, f"{path}: cannot decode ({type(exc).__name__}: {exc})"


def _collate(samples):
    ok = [(k, t) for k, t, e in samples if e is None]
    errors = [(k, e) for k, _, e in samples if e is not None]
    keys = [k for k, _ in ok]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return keys, batch, errors


def decode_batches(rows: Sequence[tuple[object, str]], preprocess, batch_size: int = 16,
                   workers: int = 1, pin_memory: bool = False
                   ) -> Iterator[tuple[list, torch.Tensor | None, list[tuple[object, str]]]]:
    """``(keys, preprocessed batch or None, errors)`` for ``rows`` of (key, path), in order;
    decoding runs in ``workers`` DataLoader processes (0 = in this process)."""
    yield from DataLoader(
        _Decode(rows, preprocess), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None,
        persistent_workers=False, pin_memory=pin_memory,
    )
