"""Closed-form ridge regression from running sums, one model per layer.

The trainer never keeps its samples: per layer it adds up the Gram matrix of
the features (with a constant column), their products with the targets and
the targets' squares. A fit, and the R^2 of any fit on another set of sums,
follow from those alone, so the corpus can be as long as the teacher's time
allows at a memory cost of ``L * F * F`` numbers.
"""

from __future__ import annotations

import torch


class RidgeSums:
    """Per layer: ``gram`` [L, F+1, F+1], ``cross`` [L, F+1, H], ``squares``
    [L, H] and ``count`` [L], in float64 (the last feature is the constant 1)."""

    def __init__(self, num_layers: int, num_features: int, num_targets: int):
        width = num_features + 1
        self.gram = torch.zeros(num_layers, width, width, dtype=torch.float64)
        self.cross = torch.zeros(num_layers, width, num_targets, dtype=torch.float64)
        self.squares = torch.zeros(num_layers, num_targets, dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer: int, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Samples ``features`` [N, F] with ``targets`` [N, H] of one layer."""
        x = torch.cat([features.double().cpu(),
                       torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        y = targets.double().cpu()
        self.gram[layer] += x.T @ x
        self.cross[layer] += x.T @ y
        self.squares[layer] += y.square().sum(0)
        self.count[layer] += len(x)


def fit(sums: RidgeSums, columns: list[list[int]], alpha: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge on standardised features: for head h, the features ``columns[h]``
    predict target h. ``alpha`` is per sample (the penalty on the
    correlation matrix). Returns raw-feature weights [L, F, H] (0 outside a
    head's columns) and biases [L, H], float64."""
    num_layers, width, num_heads = sums.cross.shape
    weights = torch.zeros(num_layers, width - 1, num_heads, dtype=torch.float64)
    bias = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for layer in range(num_layers):
        n = max(float(sums.count[layer]), 1.0)
        for head, cols in enumerate(columns):
            c = torch.as_tensor(cols)
            mean = sums.gram[layer, c, -1] / n
            cov = sums.gram[layer][c][:, c] / n - torch.outer(mean, mean)
            std = cov.diagonal().clamp_min(0).sqrt()
            std = torch.where(std > 1e-12, std, torch.ones_like(std))
            target_mean = sums.cross[layer, -1, head] / n
            covar = sums.cross[layer, c, head] / n - mean * target_mean
            corr = cov / torch.outer(std, std)
            scaled = torch.linalg.solve(corr + alpha * torch.eye(len(c), dtype=torch.float64),
                                        covar / std)
            w = scaled / std
            weights[layer, c, head] = w
            bias[layer, head] = target_mean - mean @ w
    return weights, bias


def r_squared(sums: RidgeSums, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[L] R^2 of the fit on ``sums``' samples, pooled over the heads:
    1 - residual / total sum of squares, each from the sums alone."""
    theta = torch.cat([weights, bias[:, None, :]], dim=1)  # [L, F+1, H]
    fitted = torch.einsum("lfh,lfg,lgh->lh", theta, sums.gram, theta)
    residual = sums.squares - 2 * (theta * sums.cross).sum(1) + fitted
    total = sums.squares - sums.cross[:, -1].square() / sums.count.clamp_min(1)[:, None]
    return 1 - residual.sum(1) / total.sum(1).clamp_min(1e-30)
