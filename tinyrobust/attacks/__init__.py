"""Adversarial attacks. `kernels` holds the traceable building blocks."""

from tinyrobust.attacks import kernels

__all__ = ["kernels"]
