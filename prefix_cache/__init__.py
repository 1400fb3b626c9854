"""Radix-tree prefix cache of KV blocks, reused across generate() calls."""

from .cache import CacheStats, PrefixCache, PrefixMatch
from .keys import block_keys

__all__ = ["CacheStats", "PrefixCache", "PrefixMatch", "block_keys"]
