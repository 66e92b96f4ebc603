"""Methods: one adapter per method behind the small interface of base.py."""

from .base import Context, Method, MethodCard, Registry, Request, Sample, default_registry, load_card

__all__ = ["Context", "Method", "MethodCard", "Registry", "Request", "Sample", "default_registry", "load_card"]
