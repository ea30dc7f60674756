"""Expert placement for FSSDP (Hecate): load prediction, Algorithm 1 (sparse materialization),
token dispatch, and Algorithm 2 (heterogeneous re-sharding of owners).

Every function here is pure and deterministic on plain integers / numpy arrays, so every rank
computes the same plan from the same (all-gathered) numbers without further communication.
Ranks are ranks inside the MoE layer's group. A target placement is ``target[e]``: the sorted
ranks that hold expert ``e`` this iteration (always including its owner).
"""

from __future__ import annotations

from collections import deque

import numpy as np


def round_robin_owners(num_experts: int, num_devices: int) -> list[int]:
    """EP's pinning and FSSDP's initial sharding: expert e on rank e mod D."""
    return [e % num_devices for e in range(num_experts)]


class LoadPredictor:
    """Sliding-window mean of the last ``window`` iterations' token counts ``[D, E]`` (the counts
    are all-gathered, so every rank predicts the same numbers)."""

    def __init__(self, window: int = 5):
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.history: deque[np.ndarray] = deque(maxlen=window)

    def update(self, counts: np.ndarray) -> None:
        self.history.append(np.asarray(counts, dtype=np.float64))

    def predict(self, num_devices: int, num_experts: int) -> np.ndarray:
        """Predicted counts [D, E]: uniform (all ones) before the first iteration."""
        if not self.history:
            return np.ones((num_devices, num_experts))
        return np.mean(np.stack(self.history), axis=0)


def materialize(predicted: np.ndarray, owners: list[int], *, overlap_degree: int,
                memory_slots: int, balance: bool = True) -> list[list[int]]:
    """Algorithm 1: the target placement P' for one iteration.

    predicted [D, E]: predicted tokens from rank d to expert e. ``overlap_degree`` t: experts that
    can be fetched while the non-MoE part runs (t = T_nonMoE * bw / expert_bytes); ``memory_slots``
    m: experts a rank may hold besides its own. If t <= m, the top-t experts by predicted load are
    materialized on every rank. Otherwise the D*m slots go to experts in proportion to their load
    (largest remainder), each replica on the rank with free slots that sends it the most tokens.
    ``balance``: then spend the slots still free on replicas that lower the predicted most loaded
    rank (:func:`_balance`): owner-bound experts otherwise pile up on a few owners.
    """
    num_devices, num_experts = predicted.shape
    if overlap_degree < 0 or memory_slots < 0:
        raise ValueError(f"overlap_degree={overlap_degree} and memory_slots={memory_slots} must be >= 0")
    target = [{owners[e]} for e in range(num_experts)]
    load = predicted.sum(axis=0)
    by_load = sorted(range(num_experts), key=lambda e: (-load[e], e))
    if overlap_degree <= memory_slots:
        for e in by_load[:overlap_degree]:
            target[e] = set(range(num_devices))
    elif float(load.sum()) > 0 and num_devices * memory_slots > 0:
        _proportional(predicted, target, by_load, memory_slots)
    if balance and num_devices > 1:
        free = [memory_slots - sum(1 for e in range(num_experts) if d in target[e] and owners[e] != d)
                for d in range(num_devices)]
        _balance(np.rint(predicted).astype(np.int64), target, free)
    return [sorted(t) for t in target]


def _proportional(predicted, target, by_load, memory_slots) -> None:
    num_devices, num_experts = predicted.shape
    load = predicted.sum(axis=0)
    slots = num_devices * memory_slots
    share = slots * load / float(load.sum())
    replicas = np.minimum(np.floor(share).astype(np.int64), num_devices - 1)
    spare = slots - int(replicas.sum())
    for e in sorted(range(num_experts), key=lambda e: (-(share[e] - np.floor(share[e])), e)):
        if spare <= 0:
            break
        if replicas[e] < num_devices - 1:
            replicas[e] += 1
            spare -= 1
    free = [memory_slots] * num_devices
    for e in by_load:
        candidates = sorted((d for d in range(num_devices) if d not in target[e] and free[d] > 0),
                            key=lambda d: (-predicted[d, e], -free[d], d))
        for d in candidates[:int(replicas[e])]:
            target[e].add(d)
            free[d] -= 1


def _balance(counts: np.ndarray, target: list[set], free: list[int]) -> None:
    """Greedy: while a rank has a free slot, replicate the expert bringing the most tokens to the
    most loaded rank onto the least loaded rank with a free slot, if that lowers the predicted
    (maximum, sum of squares) of the ranks' loads."""
    num_devices, num_experts = counts.shape
    def score(placement):  # the peak first, then the spread (a tie at the peak is no progress)
        load = dispatch_plan(counts, placement).sum(axis=(0, 1)).astype(np.float64)
        return (load.max(), float((load ** 2).sum()))

    listed = [sorted(t) for t in target]
    best = score(listed)
    while any(f > 0 for f in free):
        plan = dispatch_plan(counts, listed)
        load = plan.sum(axis=(0, 1))
        hot = int(np.argmax(load))
        options = sorted((e for e in range(num_experts) if hot in target[e] and plan[:, e, hot].sum() > 0),
                         key=lambda e: (-int(plan[:, e, hot].sum()), e))
        moved = False
        for e in options:
            spots = sorted((d for d in range(num_devices) if free[d] > 0 and d not in target[e]),
                           key=lambda d: (load[d], d))
            if not spots:
                continue
            d = spots[0]
            target[e].add(d)
            trial = [sorted(t) for t in target]
            value = score(trial)
            if value < best:
                best, listed, moved = value, trial, True
                free[d] -= 1
                break
            target[e].discard(d)
        if not moved:
            return


def waterfill(loads: np.ndarray, amount: int) -> np.ndarray:
    """Split ``amount`` integer tokens over devices with current ``loads`` so the least loaded are
    levelled first (the remainder one by one to the least loaded, lowest index first)."""
    m = len(loads)
    order = np.argsort(loads, kind="stable")
    s = loads[order].astype(np.float64)
    k, level = m, 0.0
    for k in range(1, m + 1):
        level = (amount + s[:k].sum()) / k
        if k == m or level <= s[k]:
            break
    alloc = np.zeros(m, dtype=np.int64)
    for i in range(k):
        alloc[order[i]] = max(0, int(np.floor(level - s[i])))
    rest = amount - int(alloc.sum())
    for i in sorted(range(m), key=lambda i: (loads[i] + alloc[i], i))[:rest]:
        alloc[i] += 1
    return alloc


def dispatch_plan(counts: np.ndarray, target: list[list[int]]) -> np.ndarray:
    """How many tokens rank r sends to rank d for expert e: ``plan [D, E, D]``.

    counts [D, E]: tokens (token-expert assignments) on rank r for expert e. A token stays on its
    rank when the expert is materialized there; otherwise its tokens are split over the expert's
    replicas to level the ranks' loads (largest groups first). Under EP ``target[e]`` is the owner
    alone, so every token goes to the owner.
    """
    num_devices, num_experts = counts.shape
    plan = np.zeros((num_devices, num_experts, num_devices), dtype=np.int64)
    load = np.zeros(num_devices, dtype=np.int64)
    rest = []
    for e in range(num_experts):
        for r in range(num_devices):
            n = int(counts[r, e])
            if n == 0:
                continue
            if r in target[e]:
                plan[r, e, r] = n
                load[r] += n
            else:
                rest.append((-n, e, r))
    for neg_n, e, r in sorted(rest):
        holders = np.asarray(target[e])
        alloc = waterfill(load[holders], -neg_n)
        plan[r, e, holders] = alloc
        load[holders] += alloc
    return plan


def reshard_owners(loads: list[np.ndarray], num_devices: int) -> list[list[int]]:
    """Algorithm 2 (heterogeneous sharding): new owners for every layer's experts.

    loads[l]: predicted tokens per expert of layer l ``[E_l]``. Every rank gets the same number of
    expert slots over all layers (sum E_l / D, the first ranks one more when it does not divide),
    but may own 0..E_l experts of one layer. Experts are placed heaviest first (load as a fraction
    of its layer's tokens) on the rank with a free slot and the least owned load in that layer, so
    each layer's owner-bound tokens spread evenly.
    """
    total = sum(len(x) for x in loads)
    capacity = [total // num_devices + (1 if d < total % num_devices else 0) for d in range(num_devices)]
    items = []
    for layer, x in enumerate(loads):
        x = np.asarray(x, dtype=np.float64)
        denom = float(x.sum()) or 1.0
        items.extend((-x[e] / denom, layer, e) for e in range(len(x)))
    owners = [[-1] * len(x) for x in loads]
    layer_load = [np.zeros(num_devices) for _ in loads]
    layer_count = [np.zeros(num_devices, dtype=np.int64) for _ in loads]
    for neg, layer, e in sorted(items):
        d = min((d for d in range(num_devices) if capacity[d] > 0),
                key=lambda d: (layer_load[layer][d], layer_count[layer][d], d))
        owners[layer][e] = d
        capacity[d] -= 1
        layer_load[layer][d] += -neg
        layer_count[layer][d] += 1
    return owners


def owner_imbalance(loads: list[np.ndarray], owners: list[list[int]], num_devices: int) -> float:
    """Sum over layers of the largest fraction of a layer's load owned by one rank (lower is
    better): the cost Algorithm 2's plan must lower before experts move."""
    cost = 0.0
    for x, own in zip(loads, owners):
        x = np.asarray(x, dtype=np.float64)
        per = np.zeros(num_devices)
        np.add.at(per, np.asarray(own, dtype=np.int64), x)
        cost += per.max() / (x.sum() or 1.0)
    return cost
