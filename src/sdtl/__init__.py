"""sdtl: self-distillation guided transfer learning for video action recognition.

Where things live (see docs/design.md): clips are sampled in :mod:`sdtl.data`, encoders are built
in :mod:`sdtl.models`, Algorithm 1's regularizer is :class:`sdtl.SelfDistillation`
(:mod:`sdtl.regularizers.self_distillation`), and the fine-tuning loop is :mod:`sdtl.engine.finetune`.
"""
__version__ = "0.1.0"
__all__ = ["SelfDistillation", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import sdtl` (and so `sdtl --help`) must not pay torch's import time.
    if name == "SelfDistillation":
        from sdtl.regularizers.self_distillation import SelfDistillation

        return SelfDistillation
    raise AttributeError(f"module 'sdtl' has no attribute {name!r}")
