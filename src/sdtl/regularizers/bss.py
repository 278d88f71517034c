"""BSS: batch spectral shrinkage (Chen, Wang, Fu, Long & Wang, NeurIPS 2019).

Fine-tuning on little data transfers pre-trained directions that do not help the new task; their
trace is the smallest singular values of the batch's feature matrix. BSS shrinks them:

    Ω(F) = η · Σ_{i=1..k} σ²_{m+1−i}(F),    F ∈ ℝ^{b×d} the batch's features, m = min(b, d)

``weight`` is η (official and TLlib: η = 0.001), ``k`` the number of smallest singular values
(official: k = 1). Nothing is precomputed and nothing is stored in checkpoints.

Choices the paper leaves open, as made here:

* F are the encoder's pooled features (what the linear head sees), per process under DDP (a batch of
  8 clips per GPU gives m = 8);
* the singular values are computed in float32 with :func:`torch.linalg.svdvals`, whose gradient is
  well defined even with repeated singular values (the gradient through singular *vectors* is not);
* no centring of F (as the official code).
"""
from __future__ import annotations

import torch
from torch import nn

from sdtl.regularizers.base import Regularizer
from sdtl.regularizers.options.bss import BSSOptions


class BSS(Regularizer):
    """``η · Σ`` of the ``k`` smallest squared singular values of the batch's feature matrix."""

    part = "bss"
    weight_symbol = "eta"

    def __init__(self, encoder: nn.Module | None = None, weight: float = 0.001, k: int = 1) -> None:
        super().__init__(weight)
        BSSOptions(k=k)  # the checks
        self.k = int(k)

    def loss(self, ctx, student_features: torch.Tensor) -> torch.Tensor:
        features = student_features.float().flatten(1)
        sigma = torch.linalg.svdvals(features)  # descending, length min(b, d)
        if self.k > sigma.numel():
            raise ValueError(f"BSS k={self.k} but a batch of {features.shape[0]} clips with {features.shape[1]}-d "
                             f"features has only {sigma.numel()} singular values; lower regularizer.k")
        return self.weight * sigma[-self.k:].pow(2).sum()

    def extra_repr(self) -> str:
        return f"eta={self.weight}, k={self.k}"
