"""How much criteria agree: rank correlations and the overlap of their bottom-k layer sets (the
paper's one checkable claim is that criteria disagree)."""

import itertools

import numpy as np
from scipy import stats


def bottom_k(scores: dict[str, float], k: int) -> set[str]:
    return set(sorted(scores, key=lambda name: (scores[name], name))[:k])


def compare(scores_by_criterion: dict[str, dict[str, float]], bottom_fraction: float = 0.05) -> list[dict]:
    """Each pair of criteria compared on the layers both score (``bn_scale`` leaves layers without a
    BatchNorm unscored)."""
    rows = []
    for a, b in itertools.combinations(scores_by_criterion, 2):
        names = sorted(scores_by_criterion[a].keys() & scores_by_criterion[b].keys())
        first, second = ({n: scores_by_criterion[c][n] for n in names} for c in (a, b))
        x = np.array([first[n] for n in names])
        y = np.array([second[n] for n in names])
        k = max(1, round(bottom_fraction * len(names)))
        overlap = len(bottom_k(first, k) & bottom_k(second, k))
        rows.append({"a": a, "b": b, "layers": len(names), "spearman": float(stats.spearmanr(x, y).statistic),
                     "kendall": float(stats.kendalltau(x, y).statistic), "bottom_k": k,
                     "bottom_k_overlap": overlap / k})
    return rows
