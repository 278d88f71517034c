"""sdtl: self-distillation guided transfer learning for video action recognition."""

__version__ = "0.1.0"
