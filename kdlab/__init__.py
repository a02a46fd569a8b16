"""kdlab: knowledge-distillation experiments with Hydra configs and Lightning training."""

__version__ = "0.1.0"
