"""Methods: one adapter per method behind the small interface of base.py, built from cards."""

from .base import Context, Method, MethodBase, Request, Sample
from .cards import MethodCard, Registry, default_registry, load_card

__all__ = ["Context", "Method", "MethodBase", "MethodCard", "Registry", "Request", "Sample", "default_registry",
           "load_card"]
