"""Block keys: token ids cut into fixed-size blocks, each keyed by an xxh3 chain.

The key of block i is ``xxh3_64(key(i-1) || tokens(i) || namespace)`` and the key
before block 0 (the root key) derives from the namespace alone, so equal prefixes
under one namespace give equal chains, and no key is shared across namespaces.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

TokenIds = Sequence[int] | torch.Tensor

_ROOT_SEED = b"specdec.prefix_cache.root"


def namespace_bytes(namespace: str | None) -> bytes:
    """Bytes that tag a namespace; ``None`` is its own namespace, distinct from ``""``."""
    if namespace is None:
        return b"\x00"
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a str or None, got {type(namespace).__name__}")
    return b"\x01" + namespace.encode("utf-8")


def root_key(namespace: str | None) -> int:
    """The key a namespace's chain starts from."""
    return xxhash.xxh3_64_intdigest(_ROOT_SEED + namespace_bytes(namespace))


def block_key(parent_key: int, tokens: Sequence[int], ns: bytes) -> int:
    """Key of one block: xxh3_64(parent key (u64 LE) || tokens (int64 LE) || namespace bytes)."""
    token_bytes = np.asarray(tokens, dtype="<i8").tobytes()
    return xxhash.xxh3_64_intdigest(parent_key.to_bytes(8, "little") + token_bytes + ns)


def as_token_list(token_ids: TokenIds) -> list[int]:
    """Token ids as a list of Python ints; ValueError for anything else (floats, 2-D tensors, bools)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex() \
                or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be a 1-D integer tensor (select one row first), "
                             f"got shape {tuple(token_ids.shape)} dtype {token_ids.dtype}")
        return token_ids.tolist()
    ids = list(token_ids)
    if all(type(t) is int for t in ids):  # the common case, ~20x cheaper than the checks below
        return ids
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"token_ids must be integers, got {t!r} ({type(t).__name__}); "
                             "pass token ids, not text or logits")
    return [int(t) for t in ids]


def token_blocks(ids: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The full blocks of ``ids`` as tuples (a trailing partial block is dropped)."""
    n = len(ids) // block_size
    return [tuple(ids[i * block_size:(i + 1) * block_size]) for i in range(n)]


def chain_keys(ids: Sequence[int], block_size: int, namespace: str | None = None
               ) -> tuple[list[int], list[tuple[int, ...]]]:
    """Chained keys and token tuples of the full blocks of ``ids`` (a list of ints).

    Same keys as ``block_key`` block by block, but the token bytes are made in one go.
    """
    n = len(ids) // block_size
    blocks = token_blocks(ids, block_size)
    if not n:
        return [], blocks
    ns, key, keys = namespace_bytes(namespace), root_key(namespace), []
    raw, step = np.asarray(ids[:n * block_size], dtype="<i8").tobytes(), 8 * block_size
    digest = xxhash.xxh3_64_intdigest
    for lo in range(0, n * step, step):
        key = digest(key.to_bytes(8, "little") + raw[lo:lo + step] + ns)
        keys.append(key)
    return keys, blocks


def block_keys(ids: TokenIds, block_size: int, namespace: str | None = None) -> list[int]:
    """Chained keys of the full blocks of ``ids`` (one key per block)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return chain_keys(as_token_list(ids), block_size, namespace)[0]
