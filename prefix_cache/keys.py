"""Block keys: token ids cut into fixed-size blocks, each keyed by an xxh3 chain.

The key of block i is ``xxh3_64(key(i-1) || tokens(i) || tag)`` and the key before
block 0 (the root key) derives from the tag alone. The tag holds the namespace (a tenant)
and, when given, the identity of the model whose K/V the block holds
(``prefix_cache.identity``), so equal prefixes under one namespace and model give equal
chains, and no key is shared across namespaces or models.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

TokenIds = Sequence[int] | torch.Tensor

_ROOT_SEED = b"specdec.prefix_cache.root"
_PACK_KEY = struct.Struct("<Q").pack_into   # a parent key (u64 LE) written into a record in place


def namespace_bytes(namespace: str | None) -> bytes:
    """Bytes that tag a namespace; ``None`` is its own namespace, distinct from ``""``."""
    if namespace is None:
        return b"\x00"
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a str or None, got {type(namespace).__name__}")
    try:
        return b"\x01" + namespace.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"namespace must be encodable as UTF-8, got {namespace!r} (a lone surrogate at "
                         f"index {err.start}); decode tenant names with errors='replace' or pass a plain "
                         "ASCII key") from None


def key_tag(namespace: str | None, model: str | None = None) -> bytes:
    """Bytes every key of a (namespace, model identity) chain includes.

    Without a model: ``namespace_bytes`` (starts with 0 or 1). With one: 2, the namespace bytes'
    length (u64 LE), the namespace bytes, the model identity (UTF-8): no two pairs give one tag.
    """
    ns = namespace_bytes(namespace)
    if model is None:
        return ns
    if not isinstance(model, str):
        raise ValueError(f"model identity must be a str or None, got {type(model).__name__}")
    return b"\x02" + len(ns).to_bytes(8, "little") + ns + model.encode("utf-8")


def root_key(namespace: str | None, model: str | None = None) -> int:
    """The key a (namespace, model identity) chain starts from."""
    return xxhash.xxh3_64_intdigest(_ROOT_SEED + key_tag(namespace, model))


def block_key(parent_key: int, tokens: Sequence[int], ns: bytes) -> int:
    """Key of one block: xxh3_64(parent key (u64 LE) || tokens (int64 LE) || tag bytes (``key_tag``))."""
    token_bytes = np.asarray(tokens, dtype="<i8").tobytes()
    return xxhash.xxh3_64_intdigest(parent_key.to_bytes(8, "little") + token_bytes + ns)


def as_token_list(token_ids: TokenIds) -> list[int]:
    """Token ids as a list of Python ints; ValueError for anything else (floats, 2-D tensors, bools)."""
    if isinstance(token_ids, torch.Tensor):
        _check_tensor(token_ids)
        return token_ids.tolist()
    ids = list(token_ids)
    if all(type(t) is int for t in ids):  # the common case, ~20x cheaper than the checks below
        return ids
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"token_ids must be integers, got {t!r} ({type(t).__name__}); "
                             "pass token ids, not text or logits")
    return [int(t) for t in ids]


def _check_tensor(token_ids: torch.Tensor) -> None:
    if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex() \
            or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be a 1-D integer tensor (select one row first), "
                         f"got shape {tuple(token_ids.shape)} dtype {token_ids.dtype}")


def token_array(token_ids: TokenIds) -> np.ndarray:
    """Token ids as a 1-D int64 array; ValueError for anything else (floats, 2-D tensors, bools).

    Tensors and integer lists convert in C: no per-token Python work on the common paths.
    """
    if isinstance(token_ids, torch.Tensor):
        _check_tensor(token_ids)
        return token_ids.detach().cpu().numpy().astype(np.int64, copy=False)
    if not isinstance(token_ids, np.ndarray):
        token_ids = list(token_ids)
    try:
        arr = np.asarray(token_ids) if len(token_ids) else np.zeros(0, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
        return np.asarray(as_token_list(token_ids), dtype=np.int64)   # raises the precise ValueError
    return arr.astype(np.int64, copy=False)


class BlockChain:
    """The full blocks of one prompt, their chained keys computed on demand.

    A lookup (``RadixTree.match_blocks``) computes a block's key from its parent node's key
    (``key_after``) only where it steps to another node's children, and stops at the first miss, so
    a prompt that shares nothing with the cache hashes one block, whatever its length. An insert
    hashes its new blocks in one pass (``keys_from``): every block's record ``parent key || tokens ||
    namespace`` laid out in one buffer by numpy, then per block only the parent key is written in place.

    A block's tokens come as a tuple of ints (``tokens``) or as their int64 LE bytes
    (``token_bytes``, what the cache's tree stores: one slice, no per-token objects).
    """

    def __init__(self, ids: np.ndarray, block_size: int, namespace: str | None = None,
                 model: str | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = len(ids) // block_size
        self._ids = ids[: self.num_blocks * block_size]
        self._raw = self._ids.astype("<i8", copy=False).tobytes()
        self._ns = key_tag(namespace, model)
        self._root = root_key(namespace, model)
        self._keys: list[int] = []                 # keys of blocks 0.. as hashed by key()/keys_range()

    def __len__(self) -> int:
        return self.num_blocks

    def key_after(self, parent_key: int | None, i: int) -> int:
        """Key of block i as the child of a block keyed ``parent_key`` (None: block i starts the chain)."""
        step = 8 * self.block_size
        parent = self._root if parent_key is None else parent_key
        return xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + self._raw[i * step:(i + 1) * step] + self._ns)

    def keys_from(self, parent_key: int | None, first: int, stop: int) -> list[int]:
        """Keys of blocks ``first..stop-1``, block ``first`` the child of one keyed ``parent_key``
        (None: the chain's start), hashed in one pass over a buffer."""
        m, ns, step = stop - first, self._ns, 8 * self.block_size
        if m <= 0:
            return []
        rec = 8 + step + len(ns)
        buf = np.empty((m, rec), dtype=np.uint8)                # per block: key slot | tokens | namespace
        buf[:, 8:8 + step] = np.frombuffer(self._raw, np.uint8, m * step, first * step).reshape(m, step)
        buf[:, 8 + step:] = np.frombuffer(ns, np.uint8)
        mem, pack, digest = memoryview(buf).cast("B"), _PACK_KEY, xxhash.xxh3_64_intdigest
        last, keys = self._root if parent_key is None else parent_key, []
        for off in range(0, m * rec, rec):
            pack(mem, off, last)
            last = digest(mem[off:off + rec])
            keys.append(last)
        return keys

    def equal_blocks(self, i: int, tokens: bytes, j: int, limit: int) -> int:
        """How many blocks from block i equal those of ``tokens`` (int64 LE bytes of whole blocks)
        from its block j, at most ``limit``: one bytes comparison when all do, else one numpy pass."""
        step = 8 * self.block_size
        limit = max(0, min(limit, self.num_blocks - i, len(tokens) // step - j))
        mine, theirs = self._raw[i * step:(i + limit) * step], tokens[j * step:(j + limit) * step]
        if mine == theirs:
            return limit
        a, b = (np.frombuffer(x, "<i8").reshape(limit, self.block_size) for x in (mine, theirs))
        return int((a != b).any(axis=1).argmax())

    def key(self, i: int) -> int:
        """Key of block i (hashing blocks up to i the first time)."""
        return self.keys_range(i, i + 1)[0]

    def keys(self) -> list[int]:
        """Keys of every block."""
        return self.keys_range(0, self.num_blocks)

    def keys_range(self, first: int, stop: int) -> list[int]:
        """Keys of blocks ``first..stop-1`` (hashing any not hashed yet in one pass)."""
        done = len(self._keys)
        if done < stop:
            self._keys += self.keys_from(self._keys[-1] if done else None, done, stop)
        return self._keys[first:stop]

    def tokens(self, i: int) -> tuple[int, ...]:
        """Token ids of block i."""
        return tuple(self._ids[i * self.block_size:(i + 1) * self.block_size].tolist())

    def token_bytes(self, i: int) -> bytes:
        """Token ids of block i as int64 LE bytes (equal bytes iff equal tokens)."""
        step = 8 * self.block_size
        return self._raw[i * step:(i + 1) * step]

    def token_bytes_range(self, first: int, stop: int) -> list[bytes]:
        """``token_bytes`` of blocks ``first..stop-1``."""
        step, raw = 8 * self.block_size, self._raw
        return [raw[lo:lo + step] for lo in range(first * step, stop * step, step)]


def block_keys(ids: TokenIds, block_size: int, namespace: str | None = None, model: str | None = None) -> list[int]:
    """Chained keys of the full blocks of ``ids`` (one key per block); ``model``: a model identity
    (``prefix_cache.identity.model_identity``) or None."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return BlockChain(token_array(ids), block_size, namespace, model).keys()
