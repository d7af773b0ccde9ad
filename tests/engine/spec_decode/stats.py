"""Pearson's chi-square goodness of fit, without scipy: small expected bins merged, the p-value from the regularized
upper incomplete gamma function."""
from __future__ import annotations

import torch

SIGNIFICANCE = 1e-3  # fixed: a correct sampler fails one run in a thousand


def chi_square_p_value(observed: dict, expected_probs: dict, num_samples: int, min_expected: float = 5.0) -> float:
    """observed: outcome -> count; expected_probs: outcome -> probability (outcomes with probability 0 must not be
    observed). Bins expected below min_expected are pooled into one."""
    impossible = [outcome for outcome in observed if expected_probs.get(outcome, 0.0) <= 0.0]
    assert not impossible, f"outcomes the target gives probability 0: {impossible[:5]}"
    bins, pooled_observed, pooled_expected = [], 0, 0.0
    for outcome, probability in expected_probs.items():
        expected = probability * num_samples
        if expected < min_expected:
            pooled_observed += observed.get(outcome, 0)
            pooled_expected += expected
        else:
            bins.append((observed.get(outcome, 0), expected))
    if pooled_expected > 0:
        bins.append((pooled_observed, pooled_expected))
    statistic = sum((o - e) ** 2 / e for o, e in bins)
    degrees = len(bins) - 1
    assert degrees >= 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def reference_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """The target distribution of one row, written out plainly (sorted lists, no batching) as an independent check
    of the sampler's temperature → min_p → top_k → top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    keep = probs >= min_p * probs.max()
    order = sorted(range(len(probs)), key=lambda token: -float(probs[token]))
    if top_k > 0:
        for token in order[top_k:]:
            keep[token] = False
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    kept = kept / kept.sum()
    if top_p < 1.0:
        total, chosen = 0.0, []
        for token in order:
            if not keep[token]:
                continue
            chosen.append(token)
            total += float(kept[token])
            if total >= top_p - 1e-12:
                break
        mask = torch.zeros_like(keep)
        mask[chosen] = True
        kept = torch.where(mask, kept, torch.zeros_like(kept))
        kept = kept / kept.sum()
    return kept
