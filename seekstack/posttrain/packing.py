"""Packing: several conversations' rows in one row of at most seq_len tokens, so short ones waste no compute on
padding (TRL's `SFTConfig(packing=True)` with its "bfd" strategy). Each keeps its own positions, restarting at 0,
which the model reads as sequences packed in a row (`Transformer.forward`): each attends within itself alone and its
losses are those it has alone in a row, so a packed batch trains as the same rows padded do.
"""

from __future__ import annotations

import bisect
import heapq

import torch

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.padding import pad_labelled, pad_rows

Row = tuple[list[int], list[int]]  # a conversation's (input_ids, labels)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The indices of `lengths` in bins of `capacity`: longest first, each into the bin with the least room that
    still holds it (the lowest-numbered of those), a new bin when none does. The open bins are kept by the room they
    have left, at most capacity + 1 distinct values, so a row's bin is found in O(log capacity) whatever the number
    of bins, as TRL's segment tree finds it (a sorted list of every bin's room made packing quadratic)."""
    bins: list[list[int]] = []
    rooms: list[int] = []  # the distinct rooms open bins have left, ascending
    open_bins: dict[int, list[int]] = {}  # room -> the bins with that room left, a heap: lowest first
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        fitting = bisect.bisect_left(rooms, length)
        if fitting == len(rooms):
            bins.append([])
            left, chosen = capacity, len(bins) - 1
        else:
            left = rooms[fitting]
            chosen = heapq.heappop(open_bins[left])
            if not open_bins[left]:
                del open_bins[left], rooms[fitting]
        bins[chosen].append(index)
        left -= length
        if left >= 0:  # a row longer than capacity fills a bin of its own
            if left not in open_bins:
                open_bins[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(open_bins[left], chosen)
    return bins


def pack_rows(rows: list[Row], seq_len: int) -> list[list[Row]]:
    """`rows`, each cut at seq_len as a padded batch cuts it, in packs of at most seq_len tokens
    (`best_fit_decreasing`)."""
    cut = [(ids[:seq_len], labels[:seq_len]) for ids, labels in rows]
    return [[cut[index] for index in pack] for pack in best_fit_decreasing([len(ids) for ids, _ in cut], seq_len)]


def pack_labelled(packs: list[list[Row]], pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, positions), each (B, T), T the longest pack: row b the rows of packs[b] one after another,
    each's positions from 0 and its first label IGNORE_INDEX (predicted from no token of its own), then right padding
    (labels IGNORE_INDEX) whose positions go on from the last row's, as in a padded batch."""
    input_ids, labels = pad_labelled([_joined(pack) for pack in packs], pad_id, max_len)
    positions = pad_rows([_positions(pack, input_ids.shape[1]) for pack in packs], 0, input_ids.shape[1])
    return input_ids, labels, positions


def _joined(pack: list[Row]) -> Row:
    input_ids = [token for ids, _ in pack for token in ids]
    labels = [label for _, row_labels in pack for label in [IGNORE_INDEX, *row_labels[1:]]]
    return input_ids, labels


def _positions(pack: list[Row], width: int) -> list[int]:
    """Each row's positions from 0, the last's going on over the padding to `width`."""
    positions = [position for ids, _ in pack[:-1] for position in range(len(ids))]
    return positions + list(range(width - len(positions)))
