"""Forgetting diagnostics: how far the encoder has moved from where fine-tuning started.

Self-distillation exists to slow forgetting, so sdtl measures forgetting every epoch on a fixed
probe batch (the same clips, centre crop, encoder in eval mode), REFERENCE §7:

* ``feat_drift``: ``mean‖f_t − f_0‖² / mean‖f_0‖²`` (relative feature drift from the initial encoder);
* ``feat_cos``: mean cosine similarity between ``f_t`` and ``f_0``;
* ``feat_cka``: linear CKA between the probe features of ``f_0`` and ``f_t``;
* ``epoch_drift``: relative feature drift over the last epoch (from the previous epoch's features,
  i.e. from the self-distillation teacher's);
* ``param_drift``: ``‖θ_t − θ_0‖ / ‖θ_0‖`` over the encoder's parameters.

The probe (clips, initial features, initial parameters) lives in ``OUT/probe.pt`` so a resumed
run measures against the same reference.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment between two feature matrices ``[N, D1]``, ``[N, D2]``."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (x.T @ y).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else float("nan")


def relative_drift(f: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.double().pow(2).sum(1).mean()
    return float((f.double() - ref.double()).pow(2).sum(1).mean() / denom) if denom > 0 else float("nan")


class ForgettingProbe:
    def __init__(self, clips: torch.Tensor, ref_features: torch.Tensor, ref_params: dict[str, torch.Tensor],
                 prev_features: torch.Tensor | None = None) -> None:
        self.clips = clips
        self.ref_features = ref_features
        self.ref_params = ref_params
        self.prev_features = prev_features if prev_features is not None else ref_features

    @classmethod
    def build(cls, encoder: nn.Module, clips: torch.Tensor, device: torch.device) -> "ForgettingProbe":
        feats = encode(encoder, clips, device)
        params = {k: v.detach().cpu().clone() for k, v in encoder.named_parameters()}
        return cls(clips, feats, params)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"clips": self.clips, "ref_features": self.ref_features, "ref_params": self.ref_params}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, prev_features: torch.Tensor | None = None) -> "ForgettingProbe":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(obj["clips"], obj["ref_features"], obj["ref_params"], prev_features)

    def measure(self, encoder: nn.Module, device: torch.device) -> dict:
        feats = encode(encoder, self.clips, device)
        ref = self.ref_features.double()
        cos = torch.nn.functional.cosine_similarity(feats.double(), ref, dim=1).mean()
        num = den = 0.0
        for name, p in encoder.named_parameters():
            p0 = self.ref_params[name]
            num += float((p.detach().cpu().double() - p0.double()).pow(2).sum())
            den += float(p0.double().pow(2).sum())
        out = {
            "feat_drift": relative_drift(feats, self.ref_features),
            "feat_cos": float(cos),
            "feat_cka": linear_cka(self.ref_features, feats),
            "epoch_drift": relative_drift(feats, self.prev_features),
            "param_drift": (num ** 0.5) / (den ** 0.5) if den > 0 else float("nan"),
        }
        self.prev_features = feats
        return out


@torch.no_grad()
def encode(encoder: nn.Module, clips: torch.Tensor, device: torch.device, batch: int = 16) -> torch.Tensor:
    was_training = encoder.training
    encoder.eval()
    out = [encoder(clips[i:i + batch].to(device)).float().cpu() for i in range(0, len(clips), batch)]
    encoder.train(was_training)
    return torch.cat(out)
