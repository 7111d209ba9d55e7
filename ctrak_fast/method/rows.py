"""Training images as featurization reads them: a tensor [N, C, H, W] in memory, or a row source
read a batch at a time (``len``, ``.shape`` (N, C, H, W), ``source[i:j]`` a float tensor
[j-i, C, H, W]: ctrak_fast.data.image_sequence.ImageSequence, images still on disk).
Featurization asks for one batch of rows at a time, so a row source featurizes with O(batch)
images resident however large the set; a torchrun unit or a resumed run reads only its rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ctrak_fast.engine.validation import check_image_rows


class RowRange:
    """Rows [start, stop) of a row source, unread until sliced: ``rng[i:j]`` is
    ``source[start + i : start + j]``.

    Examples:
        >>> rng = RowRange(torch.arange(10.0).reshape(10, 1, 1, 1), 4, 8)
        >>> len(rng), rng.shape, rng[1:3].flatten().tolist()
        (4, (4, 1, 1, 1), [5.0, 6.0])
    """

    def __init__(self, source: Any, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *tuple(self.source.shape)[1:])

    def __getitem__(self, sl: slice) -> torch.Tensor:
        start, stop, step = sl.indices(len(self))
        if step != 1:
            raise ValueError("rows are read in contiguous slices")
        return self.source[self.start + start : self.start + stop]  # type: ignore[no-any-return]


def rows_of(images: Any, sl: slice) -> Any:
    """images[sl] left unread: a tensor's view, or a RowRange of a row source."""
    if isinstance(images, torch.Tensor):
        return images[sl]
    start, stop, _ = sl.indices(len(images))
    return RowRange(images, start, stop)


def read_rows(images: Any, sl: slice, ids: torch.Tensor) -> torch.Tensor:
    """The rows `sl` as a float tensor; a row source's are checked finite as they are read (an
    in-memory tensor was checked whole by check_training_data)."""
    batch = images[sl]
    if not isinstance(images, torch.Tensor):
        check_image_rows(batch, ids[sl])
    return batch  # type: ignore[no-any-return]


class RowSelection:
    """Rows `index` (int64 [n]) of a tensor or of a row source that reads lists of rows
    (``source[[i, j, ...]]``, as an ImageSequence does), unread until sliced: ``sel[a:b]`` is
    ``source[index[a:b]]``; what a second pass over some rows of a set on disk reads."""

    def __init__(self, source: Any, index: torch.Tensor) -> None:
        self.source, self.index = source, index.to(torch.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *tuple(self.source.shape)[1:])

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return self.source[self.index[sl]]  # type: ignore[no-any-return]


def select_rows(images: Any, index: torch.Tensor) -> Any:
    """images[index]: gathered now from a tensor, left unread (a RowSelection) for a row source."""
    if isinstance(images, torch.Tensor):
        return images[index]
    return RowSelection(images, index)
