"""Exact minimum-cost balanced assignment of n items to E bins of n / E items each (shortest augmenting paths)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _move_costs(cost: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, who) [E, E]: w[a, b] = cheapest extra cost of moving one item of bin a to bin b, who[a, b] = that item."""
    num_bins = slots.shape[0]
    filled = slots >= 0  # [E, cap]
    items = np.where(filled, slots, 0)  # [E, cap]
    rows = cost[items]  # [E, cap, E]
    own = np.take_along_axis(rows, np.arange(num_bins)[:, None, None], axis=2)  # [E, cap, 1]
    delta = np.where(filled[:, :, None], rows - own, np.inf)  # [E, cap, E]
    best = delta.argmin(axis=1)  # [E, E] slot of the cheapest item per (a, b); first slot on ties
    w = np.take_along_axis(delta, best[:, None, :], axis=1)[:, 0, :]  # [E, E]
    np.fill_diagonal(w, np.inf)
    return w, np.take_along_axis(slots, best, axis=1)


def balanced_assignment(cost: Tensor, capacity: int) -> Tensor:
    """[n] int64 bin ids minimising sum_i cost[i, bin(i)] with every bin holding exactly `capacity` items.

    cost: [n, E] with n == E * capacity. Items are inserted one at a time along a shortest augmenting path
    (the row-by-row scheme of the Hungarian / Jonker-Volgenant algorithms, on the E-node graph of bins:
    item -> bin a, an item of a moves on to bin b, ... until a bin with room), so after each insertion the
    assignment of the items seen so far is optimal. Deterministic: ties go to the lower index.
    O(n * (n E + E^3)) time, O(n E) memory: ~a second for n = 1536, E = 16.
    """
    n, num_bins = cost.shape
    if n != num_bins * capacity:
        raise ValueError(f"balanced_assignment: {n} items cannot fill {num_bins} bins of {capacity}")
    c = cost.detach().to(torch.float64).cpu().numpy()  # [n, E]
    if not np.isfinite(c).all():
        raise ValueError("balanced_assignment: costs must be finite")
    # A path whose cost improves by less than this is a rounding artefact, not a shorter path.
    tolerance = 1e-12 * (1.0 + float(np.abs(c).max(initial=0.0)))
    slots = np.full((num_bins, capacity), -1, dtype=np.int64)  # [E, cap] item ids; -1 = free
    count = np.zeros(num_bins, dtype=np.int64)  # [E]
    slot_of = np.zeros(n, dtype=np.int64)  # [n]
    assignment = np.full(n, -1, dtype=np.int64)  # [n]
    bins = np.arange(num_bins)
    for item in range(n):
        dist = c[item].copy()  # [E] cost of reaching each bin
        pred = np.full(num_bins, -1, dtype=np.int64)  # [E] previous bin on the path; -1 = straight from the item
        if item > 0:
            w, who = _move_costs(c, slots)
            for _ in range(num_bins):  # Bellman-Ford: costs of moves can be negative, cycles cannot (optimality)
                via = dist[:, None] + w  # [E, E]
                best = via.argmin(axis=0)  # [E]
                shorter = via[best, bins] < dist - tolerance
                if not shorter.any():
                    break
                dist[shorter] = via[best, bins][shorter]
                pred[shorter] = best[shorter]
        open_bins = np.flatnonzero(count < capacity)
        end = int(open_bins[np.argmin(dist[open_bins])])
        path = [end]
        while pred[path[-1]] >= 0:
            path.append(int(pred[path[-1]]))
            if len(path) > num_bins:
                raise AssertionError("balanced_assignment: cycle in the augmenting path")
        path.reverse()  # bin the item enters first, ..., bin with room
        incoming = item
        for a, b in zip(path, path[1:], strict=False):
            leaving = int(who[a, b])  # w and who were computed before any move: the path's bins are distinct
            slots[a, slot_of[leaving]] = incoming
            slot_of[incoming], assignment[incoming] = slot_of[leaving], a
            incoming = leaving
        slots[end, count[end]] = incoming
        slot_of[incoming], assignment[incoming] = count[end], end
        count[end] += 1
    return torch.from_numpy(assignment)
