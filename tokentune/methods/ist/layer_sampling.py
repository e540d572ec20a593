"""The math of IST and RST as pure functions of a score vector and a seeded generator.

IST keeps a score per layer (higher = *less* important). ``sample_layers`` draws the layers that train
for a step with weights ``sigmoid(-s)`` (RST: uniformly); a probe round suppresses the sets from
``sample_suppression_sets`` (weights ``sigmoid(s)``), turns their losses into ``centred_rewards`` and
moves the scores with ``update_scores``.
"""

from __future__ import annotations

import itertools
import math

import torch

_MIN_WEIGHT = 1e-12  # floor for sampling weights (sigmoid underflow must not starve multinomial)
_MAX_TRIES_PER_SET = 100  # rejection sampling of distinct suppression sets, then a deterministic fill


def sample_layers(
    scores: torch.Tensor, k: int, generator: torch.Generator | None = None, uniform: bool = False
) -> torch.Tensor:
    """``k`` distinct layer indices (sorted), drawn with weights ``sigmoid(-scores)`` (or uniformly)."""
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} layers")
    weights = (
        torch.ones(n, dtype=torch.float64) if uniform else torch.sigmoid(-scores.detach().double().cpu())
    )
    idx = torch.multinomial(weights.clamp_min(_MIN_WEIGHT), k, replacement=False, generator=generator)
    return idx.sort().values


def sample_suppression_sets(
    scores: torch.Tensor, n_sets: int, n_suppress: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Up to ``n_sets`` distinct sets of ``n_suppress`` layers, each drawn with weights ``sigmoid(scores)``.

    The count is capped at ``C(L, n_suppress)``. Rejection sampling is bounded; should it fall short
    (extremely skewed weights), the remaining sets are the unused combinations of the highest-weight
    layers, so the function always terminates.
    """
    n = scores.numel()
    if not 1 <= n_suppress <= n:
        raise ValueError(f"cannot suppress {n_suppress} of {n} layers")
    n_sets = min(n_sets, math.comb(n, n_suppress))
    weights = torch.sigmoid(scores.detach().double().cpu()).clamp_min(_MIN_WEIGHT)
    chosen: list[tuple[int, ...]] = []
    for _ in range(_MAX_TRIES_PER_SET * n_sets):
        if len(chosen) == n_sets:
            break
        s = tuple(
            sorted(torch.multinomial(weights, n_suppress, replacement=False, generator=generator).tolist())
        )
        if s not in chosen:
            chosen.append(s)
    if len(chosen) < n_sets:
        by_weight = torch.argsort(weights, descending=True, stable=True).tolist()
        for combo in itertools.combinations(by_weight, n_suppress):
            s = tuple(sorted(combo))
            if s not in chosen:
                chosen.append(s)
            if len(chosen) == n_sets:
                break
    return [torch.tensor(s, dtype=torch.long) for s in chosen]


def centred_rewards(losses: torch.Tensor) -> torch.Tensor:
    """``exp(-loss_j) - mean_k exp(-loss_k)`` (float64; sums to zero)."""
    r = torch.exp(-losses.detach().double().cpu())
    return r - r.mean()


def update_scores(
    scores: torch.Tensor, sets: list[torch.Tensor], rewards: torch.Tensor, lr_s: float
) -> torch.Tensor:
    """``s_i += lr_s * r_j * p_i (1 - p_i)`` for each layer i of set j, with ``p = sigmoid(s)`` before the update."""
    p = torch.sigmoid(scores.double())
    slope = p * (1 - p)
    new = scores.double().clone()
    for layer_set, r in zip(sets, rewards.double()):
        new.index_add_(0, layer_set, lr_s * r * slope[layer_set])
    return new.to(scores.dtype)
