"""Versioned adapter store (see store.py) and the backbone checks made at registration (card.py)."""

from strata.registry.card import BackboneInfo, IncompatibleAdapter, backbone_info
from strata.registry.store import HashMismatch, Ref, Registry, RegistryError, parse_id

__all__ = ["BackboneInfo", "HashMismatch", "IncompatibleAdapter", "Ref", "Registry", "RegistryError", "backbone_info", "parse_id"]
