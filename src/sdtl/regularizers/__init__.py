"""Regularizers that keep a fine-tuned encoder close to what it knew (the self-distillation family)."""
from sdtl.regularizers.self_distillation import SelfDistillation

__all__ = ["SelfDistillation"]
