"""Host time of ``PrefixCache.insert`` per block: this checkout vs a git revision, in one process.

    python -m benchmarks.prefix_insert_ab --before 0b2f524 --out benchmarks/results/cpu

K/V is tiny (``--layers`` layers, 1 head, head_dim 4, fp32, CPU), so the copy is negligible and
what is timed is the Python work per block (hashing, tree nodes, blocks). Each insert goes into an
emptied cache; the two versions run interleaved; each figure is the fastest of ``--repeats``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .report import environment


def load_revision(rev: str, into: Path):
    """``prefix_cache`` as of git revision ``rev``, imported as the package ``prefix_cache_<rev>``."""
    name = f"prefix_cache_{rev.replace('-', '_')}"
    package = into / name
    package.mkdir(parents=True)
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "prefix_cache/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for path in files:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
        (package / Path(path).name).write_text(source.replace("from prefix_cache", f"from {name}")
                                               .replace("import prefix_cache", f"import {name}"))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare against")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from specdec import prefix_cache

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"before": load_revision(args.before, Path(tmp)), "after": prefix_cache}
        rows = []
        for n in (512, 2048, 8192):
            kv = [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4)) for _ in range(args.layers)]
            ids = torch.arange(n) % 1000
            caches = {v: mod.PrefixCache(max_bytes=1 << 34) for v, mod in versions.items()}
            best = dict.fromkeys(versions, float("inf"))
            for _ in range(args.repeats):
                for v, cache in caches.items():
                    cache.clear()
                    start = time.perf_counter()
                    cache.insert(ids, kv)
                    best[v] = min(best[v], time.perf_counter() - start)
            row = {"tokens": n, "blocks": n // 16, **{f"{v}_us_per_block": 1e6 * t / (n // 16) for v, t in best.items()}}
            row["speedup"] = row["before_us_per_block"] / row["after_us_per_block"]
            rows.append(row)
            print(f"{n:5d} tokens: before {row['before_us_per_block']:.2f} us/block, after "
                  f"{row['after_us_per_block']:.2f} ({row['speedup']:.2f}x)", flush=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"environment": environment(), "command": "python -m benchmarks.prefix_insert_ab " + " ".join(argv or sys.argv[1:]),
              "before": args.before, "after": head + (" + uncommitted changes" if subprocess.run(["git", "status", "--porcelain", "prefix_cache"], capture_output=True, text=True).stdout else ""), "layers": args.layers, "repeats": args.repeats,
              "kv": "tiny: 1 head, head_dim 4, fp32, CPU, one torch thread", "rows": rows}
    out = Path(args.out) / f"prefix-insert-ab-L{args.layers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
