"""Prefix cache TTFT in one run: miss vs hit, eager and compile=True, full-miss overhead, identity.

For each shared-prefix length L (cut to fit the model's positions) and each mode (eager,
``compile=True``): prompt = L tokens of text + a 16-token suffix that differs per call.
  miss:  specdec.generate without a cache
  cold:  with an empty PrefixCache (a full miss: lookup + insert overhead); miss_overhead = cold/miss - 1
  hit:   with a cache holding an earlier prompt of the same prefix, ``min_hit_tokens=0`` (every hit used)
  auto:  the same hit through a cache with the default ``min_hit_tokens`` (what a user gets: on a GPU
         ``specdec.hit_policy`` prefills instead where this process's prefill timings, those of the
         other three included, predict the hit slower; ``min_hit_tokens`` in the row: its threshold
         then, None for no hit at all)
TTFT = time to the first new token (streamer), median of --repeats, calls interleaved so that
machine noise hits all alike. ``identical``: --check-tokens greedy tokens with a hit equal those
without a cache (eager and compiled). Writes JSON with the environment and the command.

    python -m benchmarks.prefix_ttft --device cuda                  # default model, bf16, 2k and 8k
    python -m benchmarks.prefix_ttft --model tiny --lengths 32,64 --repeats 1    # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import specdec
from specdec.prefix_cache import PrefixCache

from . import report
from .prefix_bench import learned_threshold, load, text_ids, timed

SUFFIX = 16


def _positions(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1 << 30)


def _cache() -> PrefixCache:
    return PrefixCache(max_bytes=8 << 30, min_hit_tokens=0)


def measure(model, tok, length: int, device, repeats: int, compile: bool, check_tokens: int) -> dict:
    """One row: TTFT of miss, cold, hit and auto (module docstring) for one prefix length and mode."""
    vocab = model.get_input_embeddings().weight.shape[0]
    length = min(length, _positions(model) - SUFFIX - max(check_tokens, 1) - 1)
    prefix = text_ids(tok, length, vocab)
    suffixes = [text_ids(None, SUFFIX + i, vocab)[-SUFFIX:] for i in range(repeats + 2)]
    make = lambda s: torch.tensor([prefix + s], device=device)  # noqa: E731
    hit_cache, auto_cache = _cache(), PrefixCache(max_bytes=8 << 30)
    for cache in (hit_cache, auto_cache, None, _cache()):      # fill the caches, warm up graphs of these sizes
        timed(model, make(suffixes[0]), device, cache, compile=compile)
        timed(model, make(suffixes[0]), device, cache, compile=compile)
    times = {"miss": [], "cold": [], "hit": [], "auto": []}
    for s in suffixes[1:-1]:
        for name, cache in (("miss", None), ("cold", _cache()), ("hit", hit_cache), ("auto", auto_cache)):
            times[name].append(timed(model, make(s), device, cache, compile=compile)[0])
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row = dict(shared_tokens=length, suffix_tokens=SUFFIX, compile=compile,
               **{f"ttft_{name}_ms": v for name, v in ms.items()},
               hit_speedup=ms["miss"] / ms["hit"], auto_speedup=ms["miss"] / ms["auto"],
               miss_overhead=ms["cold"] / ms["miss"] - 1, min_hit_tokens=learned_threshold(model, compile, auto_cache))
    if check_tokens:
        ids = make(suffixes[-1])
        plain = specdec.generate(model, ids, max_new_tokens=check_tokens, compile=compile)
        cached, stats = specdec.generate(model, ids, max_new_tokens=check_tokens, compile=compile,
                                         prefix_cache=hit_cache, return_stats=True)
        row.update(identical=bool(torch.equal(plain, cached)), check_tokens=check_tokens,
                   checked_hit_tokens=stats.cached_prompt_tokens[0])
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (bundled SmolLM2-135M), 'tiny' (random 2-layer Llama, for smoke tests), "
                        "'1b' or '8b' (random Llama of that shape)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--lengths", default="2048,8192", help="shared prefix lengths in tokens (cut to fit the model)")
    p.add_argument("--modes", default="eager,compile", help="eager, compile (compile=True), or both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with/without a hit (0: skip)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compile"} or args.repeats < 1 or args.check_tokens < 0:
        p.error("--modes takes eager and/or compile, --repeats >= 1, --check-tokens >= 0")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tok = load(args.model, args.device, dtype)
    rows = []
    for mode in modes:
        for n in args.lengths.split(","):
            rows.append(measure(model, tok, int(n), args.device, args.repeats, mode == "compile", args.check_tokens))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})
    result = dict(environment=report.environment(), model=args.model, dtype=dtype, device=args.device,
                  command="python -m benchmarks.prefix_ttft " + " ".join(sys.argv[1:] if argv is None else argv),
                  rows=rows)
    name = f"prefix-ttft-{report.device_slug(result['environment'])}-{args.model}.json"
    report.write_json(result, Path(args.out) / name)
    return result


if __name__ == "__main__":
    main()
