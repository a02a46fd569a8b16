"""Model zoo: registry, architecture families, feature hooks and teacher loading."""

from .registry import UnknownModelError, available_models, build_model, register

__all__ = ["UnknownModelError", "available_models", "build_model", "register"]
