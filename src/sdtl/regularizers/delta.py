"""DELTA: feature-map distance to the pre-trained encoder, weighted by channel attention
(X. Li, Xiong, Wang, Rao, Liu, Chen & Huan, ICLR 2019, arXiv:1901.09229).

    Ω = Σ_j Σ_b Σ_c ½ · C_j · w_jc · ‖FM_jc(θ, x_b) − FM_jc(θ⁰, x_b)‖² / N_j   +   β/2 · ‖h‖²

FM_j: the 5-D map ``[B, C_j, T, H, W]`` of layer j (N_j = T·H·W), θ⁰ the frozen pre-trained encoder,
w_j the channel attention of layer j (Σ_c w_jc = 1, so C_j·w_jc averages 1), h the head. ``weight`` is
α (the official code: α = 0.01, 0.1 on Dogs), ``head_weight`` is β (0.01). Summed over the batch, as
the official code does (so α interacts with the batch size).

**Channel attention** (``attention="channel"``, computed once before training, as the official
``channel_eval.py``): (1) a new linear classifier is trained on the frozen θ⁰'s features of
``attention_samples`` training clips (10 epochs of SGD, lr 0.01, momentum 0.9, weight decay 1e-4,
batches of 32, lr × 0.1^(1/6) per epoch); (2) for every layer j and channel c, the channel's output is
zeroed and Δ_jc = CE(zeroed) − CE(full), averaged over the clips; (3) w_j = softmax(zscore(Δ_j) / 5).
``attention="none"`` uses w_jc = 1/C_j (every channel weighs 1). The weights are stored in checkpoints.

Choices the paper leaves open, as made here:

* **Layers:** the encoder's spec names them (:func:`default_layers`). CNNs: the last convolution of
  each stage, before its BatchNorm (the official ResNet choice, ``layer{1..4}.last.conv3``): for C3D
  ``conv2, conv3b, conv4b, conv5b``; for the R(2+1)D encoders the second (2+1)D conv of each stage's
  last block. Transformers: feature taps after chosen blocks, whose maps are the patch tokens as
  ``[B, D, T', H', W']`` (channel = embedding dimension; class tokens excluded), so zeroing channel c
  zeroes embedding dimension c of every patch token. ``regularizer.layers`` names others (module names).
* **Zeroing a channel** zeroes that channel of the layer's output (the official code zeroes the
  filter; the same thing for a conv without bias). With a BatchNorm after the conv, the post-BN
  channel becomes constant, not zero.
* **Clips for the attention:** the centre clip of the first ``attention_samples`` training videos
  in a seeded order (the official code: the first 4 training batches of 32 augmented images).
* **θ⁰'s BatchNorm** follows ``teacher_bn`` like SD's teacher (default ``"batch"``: batch statistics,
  so Ω = 0 at the start and measures only how far the weights moved); the official code uses eval mode.
* **Weight decay:** off for the optimizer (β/2‖h‖² replaces it on the head), as the official script.

Cost per step: one teacher forward (like SD) plus the maps' distance. Attention costs Σ_j C_j extra
forwards of ``attention_samples`` clips, once.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sdtl.regularizers.base import Regularizer, frozen_copy, load_state_into, state_of
from sdtl.regularizers.options.delta import DELTAOptions


def default_layers(encoder: nn.Module) -> list[str]:
    """The encoder's spec's DELTA layers (:mod:`sdtl.models.spec`), each a module whose output is a 5-D
    map ``[B, C, T, H, W]``: for CNNs the last convolution of every stage, before its BatchNorm; for
    transformers the :class:`~sdtl.models.spec.FeatureTap` after chosen blocks, which shows the block's
    patch tokens as a channel-first map ``[B, D, T', H', W']`` (class tokens left out)."""
    from sdtl.models.registry import spec_of_encoder

    try:
        return spec_of_encoder(encoder).feature_layers(encoder)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"DELTA has no default layers for {type(encoder).__name__} ({exc}); "
                         "name them in regularizer.layers") from exc


def conv_layer_names(encoder: nn.Module) -> list[str]:
    """Modules whose output is a 5-D map: convolutions and feature taps (what regularizer.layers may name)."""
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Conv3d) or type(m).__name__ in
            ("SpatioTemporalConv", "Conv2Plus1D", "FeatureTap")]


class DELTA(Regularizer):
    """Attention-weighted feature-map distance to a frozen copy of the encoder, plus L2 on the head."""

    part = "delta"
    replaces_weight_decay = True
    weight_symbol = "alpha"

    def __init__(self, encoder: nn.Module, head: nn.Module | None, weight: float = 0.01, head_weight: float = 0.01,
                 layers: list[str] | None = None, teacher_bn: str = "batch", attention: str = "channel",
                 attention_samples: int = 128) -> None:
        """``attention``/``attention_samples``: what :meth:`start` computes for a fresh run (the
        engine calls it); until then, or with ``attention="none"``, every channel weighs the same."""
        super().__init__(weight)
        DELTAOptions(head_weight=head_weight, layers=list(layers or []), attention=attention,
                     attention_samples=attention_samples, teacher_bn=teacher_bn)  # the checks
        self.head_weight = float(head_weight)
        self.start_clips = int(attention_samples) if attention == "channel" else 0
        self.teacher_bn = teacher_bn
        self.layers = list(layers) if layers else default_layers(encoder)
        modules = dict(encoder.named_modules())
        unknown = [n for n in self.layers if n not in modules]
        if unknown:
            raise ValueError(f"DELTA layers {unknown}: not modules of the {type(encoder).__name__} encoder; "
                             f"map layers (convolutions, feature taps) are: {', '.join(conv_layer_names(encoder))}")
        self.__dict__["student"] = encoder
        self.__dict__["head"] = head
        self.teacher = frozen_copy(encoder, batch_statistics=teacher_bn == "batch")
        self._student_maps: dict[str, torch.Tensor] = {}
        self._teacher_maps: dict[str, torch.Tensor] = {}
        self._zero: tuple[str, int] | None = None  # (layer, channel) zeroed while computing attention
        teacher_modules = dict(self.teacher.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name, self._student_maps, modules[name]))
            teacher_modules[name].register_forward_hook(self._hook(name, self._teacher_maps, teacher_modules[name]))
        # attention weights, one [C_j] vector per layer; uniform (1/C_j) until computed
        self.attention: list[torch.Tensor] | None = None

    @classmethod
    def from_options(cls, encoder: nn.Module, head: nn.Module | None, weight: float, options: DELTAOptions) -> DELTA:
        return cls(encoder, head, weight=weight, head_weight=options.head_weight, layers=options.layers or None,
                   teacher_bn=options.teacher_bn, attention=options.attention,
                   attention_samples=options.attention_samples)

    def start(self, clips: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int,
              seed: int) -> str | None:
        """A fresh run's channel attention (``attention="channel"``), from ``start_clips`` training clips."""
        self.compute_attention(clips, labels, num_classes, batch_size=batch_size, seed=seed)
        return f"DELTA channel attention from {len(clips)} clips over {self.layers}"

    def _hook(self, name: str, store: dict, owner: nn.Module):
        owner_ref = weakref.ref(owner)

        def hook(module, inputs, output):
            # A deep copy of the encoder made later (another regularizer's teacher, an averaged model)
            # inherits this hook: it must neither record nor zero anything for this DELTA.
            if module is not owner_ref():
                return None
            if self._zero is not None and self._zero[0] == name:
                output = output.clone()
                output[:, self._zero[1]] = 0
                store[name] = output
                return output
            # Student maps are kept only while training with gradients (not during validation or probes).
            if store is self._teacher_maps or (module.training and torch.is_grad_enabled()):
                store[name] = output
            return None
        return hook

    # ------------------------------------------------------------------------------ penalty
    def prepare(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        self._teacher_maps.clear()
        with torch.inference_mode():
            self.teacher(clips)
        maps = dict(self._teacher_maps)
        self._teacher_maps.clear()
        return maps

    def loss(self, ctx: dict[str, torch.Tensor], student_features: torch.Tensor) -> torch.Tensor:
        missing = [n for n in self.layers if n not in self._student_maps]
        if missing:
            raise RuntimeError(f"DELTA: no student feature map for {missing}; run the student encoder forward "
                               f"(in training mode, with gradients) before the penalty")
        total = student_features.new_zeros((), dtype=torch.float32)
        for j, name in enumerate(self.layers):
            s = self._student_maps[name].float()
            t = ctx[name]
            t = (t.clone() if t.is_inference() else t).float()
            per_channel = (s - t).pow(2).flatten(2).sum(2) / s[0, 0].numel()  # [B, C]: ‖·‖²/N
            channels = s.shape[1]
            w = (self.attention[j].to(s.device) * channels if self.attention is not None
                 else torch.ones(channels, device=s.device))
            total = total + 0.5 * (per_channel * w).sum()
        self._student_maps.clear()
        total = self.weight * total
        head = self.__dict__["head"]
        if head is not None and self.head_weight:
            total = total + 0.5 * self.head_weight * torch.stack([p.float().pow(2).sum() for p in head.parameters()]).sum()
        return total

    # ---------------------------------------------------------------------------- attention
    @torch.no_grad()
    def compute_attention(self, clips: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
        """Channel attention from the frozen θ⁰ on ``clips`` (see the module docstring); stored and returned."""
        device = next(self.teacher.parameters()).device
        labels = labels.to(device)

        def features() -> torch.Tensor:
            return torch.cat([self.teacher(clips[i:i + batch_size].to(device))
                              for i in range(0, len(clips), batch_size)])

        base = features()
        fc = _fit_linear(base, labels, num_classes, seed)
        ce_full = F.cross_entropy(fc(base), labels).item()
        self._teacher_maps.clear()
        probe = clips[:1].to(device)
        self.teacher(probe.expand(2, *probe.shape[1:]))  # 2 clips: batch statistics need more than one value
        channels_of = {name: self._teacher_maps[name].shape[1] for name in self.layers}
        weights = []
        for name in self.layers:
            channels = channels_of[name]
            delta = torch.empty(channels, dtype=torch.float64)
            for c in range(channels):
                self._zero = (name, c)
                try:
                    delta[c] = F.cross_entropy(fc(features()), labels).item() - ce_full
                finally:
                    self._zero = None
            std = delta.std(unbiased=False)
            z = (delta - delta.mean()) / std if std > 0 else torch.zeros_like(delta)
            weights.append(torch.softmax(z / 5.0, dim=0).float())
        self._teacher_maps.clear()
        self.attention = weights
        return weights

    # --------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, mid_epoch: bool = False) -> dict | None:
        return {"teacher": state_of(self.teacher), "layers": list(self.layers),
                "attention": None if self.attention is None else [w.clone() for w in self.attention]}

    def load_checkpoint_state(self, state: dict | None) -> None:
        if not state or "teacher" not in state:
            raise ValueError("delta: the checkpoint holds no reference encoder; it was not written by a delta run")
        if list(state.get("layers", [])) != self.layers:
            raise ValueError(f"delta: the checkpoint's layers {state.get('layers')} differ from the configured "
                             f"{self.layers}")
        load_state_into(self.teacher, state["teacher"], "delta reference")
        self.attention = None if state.get("attention") is None else [w.clone() for w in state["attention"]]

    def extra_repr(self) -> str:
        return (f"alpha={self.weight}, beta={self.head_weight}, layers={self.layers}, "
                f"attention={'channel' if self.attention is not None else 'uniform'}, teacher_bn={self.teacher_bn!r}")


def _fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int) -> nn.Linear:
    """The official attention step's classifier: 10 epochs of SGD on frozen features (batches of 32), the
    lr decaying exponentially by γ = 0.1^(1/6) per epoch (``channel_eval.py``: ``ExponentialLR(gamma=
    exp(log(0.1) / 6))`` stepped at each epoch's start, which in the PyTorch of its time gave epoch e the
    lr 0.01·γ^e)."""
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(features.shape[1], num_classes).to(features.device)
    bound = 1 / math.sqrt(features.shape[1])
    with torch.no_grad():
        fc.weight.copy_(torch.empty_like(fc.weight, device="cpu").uniform_(-bound, bound, generator=g))
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    with torch.enable_grad():
        for epoch in range(10):
            for group in opt.param_groups:
                group["lr"] = 0.01 * 0.1 ** (epoch / 6)
            order = torch.randperm(len(features), generator=g).to(features.device)
            for i in range(0, len(features), 32):
                idx = order[i:i + 32]
                loss = F.cross_entropy(fc(features[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return fc
