"""L2-SP: keep the encoder's weights near their pre-trained values (Li, Grandvalet & Davoine, ICML 2018,
arXiv:1802.01483).

    Ω(θ, h) = α/2 · ‖θ − θ⁰‖²  +  β/2 · ‖h‖²

θ: the encoder's parameters, θ⁰: their values when fine-tuning started (a frozen copy), h: the new
head's parameters. ``weight`` is α, ``head_weight`` is β (config ``regularizer.weight`` and
``regularizer.head_weight``). The norms are sums over elements, so a good α depends on the model's
size; the authors used α = 0.1, β = 0.01 on ResNet-101, TLlib α = β = 0.01.

Choices the paper leaves open, as made here:

* **Which parameters are anchored:** every encoder parameter, BatchNorm affine and biases included
  (as TLlib; the authors' script anchors only conv/FC kernels). BatchNorm running statistics are
  buffers and are not anchored.
* **Weight decay:** the optimizer's weight decay pulls towards 0, against θ⁰, and β/2‖h‖² already
  regularizes the head, so :attr:`replaces_weight_decay` is True and sdtl's engine sets the
  optimizer's weight decay to 0 for this run (logged), as the authors', DELTA's and TLlib's scripts do.
  Under AdamW a loss-side penalty is rescaled per parameter (Loshchilov & Hutter, ICLR 2019).
* θ⁰ is matched by parameter *name* on the encoder itself, so DDP's ``module.`` prefix cannot break
  it, and it is stored in checkpoints (a resumed run keeps the same anchor).
"""
from __future__ import annotations

import torch
from torch import nn

from sdtl.regularizers.base import Regularizer
from sdtl.regularizers.options.l2sp import L2SPOptions


class L2SP(Regularizer):
    """``α/2‖θ−θ⁰‖² + β/2‖h‖²``; ``θ⁰`` is the encoder as it is at construction."""

    part = "l2sp"
    replaces_weight_decay = True
    weight_symbol = "alpha"

    def __init__(self, encoder: nn.Module, head: nn.Module | None, weight: float = 0.01,
                 head_weight: float = 0.01) -> None:
        super().__init__(weight)
        L2SPOptions(head_weight=head_weight)  # the checks
        self.head_weight = float(head_weight)
        self.__dict__["student"] = encoder  # not a submodule: the model owns it
        self.__dict__["head"] = head
        self.reference = {name: p.detach().clone() for name, p in encoder.named_parameters()}

    @classmethod
    def from_options(cls, encoder: nn.Module, head: nn.Module | None, weight: float, options: L2SPOptions) -> L2SP:
        return cls(encoder, head, weight=weight, head_weight=options.head_weight)

    def loss(self, ctx, student_features: torch.Tensor) -> torch.Tensor:
        anchored = [(p.float() - self.reference[name].float()).pow(2).sum()
                    for name, p in self.__dict__["student"].named_parameters()]
        total = 0.5 * self.weight * torch.stack(anchored).sum()
        head = self.__dict__["head"]
        if head is not None and self.head_weight:
            total = total + 0.5 * self.head_weight * torch.stack([p.float().pow(2).sum() for p in head.parameters()]).sum()
        return total

    def checkpoint_state(self, mid_epoch: bool = False) -> dict | None:
        return {"reference": {k: v.clone() for k, v in self.reference.items()}}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict | None) -> None:
        ref = (state or {}).get("reference")
        if ref is None or ref.keys() != self.reference.keys():
            raise ValueError("l2sp: the checkpoint's anchor θ⁰ is missing or does not match the encoder's parameters")
        for name, t in self.reference.items():
            t.copy_(ref[name])

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the anchor too
        self.reference = {k: fn(v) for k, v in self.reference.items()}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"alpha={self.weight}, beta={self.head_weight}, anchored={len(self.reference)} tensors"
