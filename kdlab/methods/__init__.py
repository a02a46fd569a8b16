"""Distillation methods: one file per method, one YAML per method in conf/method/."""

from .base import Method, Outputs

__all__ = ["Method", "Outputs"]
