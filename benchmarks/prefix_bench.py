"""Prefix-cache numbers: TTFT on a hit vs a miss, the overhead of a full miss, match time.

For each shared-prefix length L: prompt = L tokens of real text + a 16-token question.
  miss:   specdec.generate without a cache
  cold:   with an empty PrefixCache (a full miss: lookup + insert overhead)
  hit:    with the cache holding an earlier prompt of the same L-token prefix (``min_hit_tokens=0``:
          the hit is used)
  auto:   the same through a cache with the default ``min_hit_tokens`` (on a GPU ``specdec.hit_policy``
          prefills instead where the timings of this process's prefills say the hit is slower)
Each call is generate(max_new_tokens=1), median of --repeats, timed two ways:
  ttft_*:  time to the first new token, seen by a streamer (its first put after the prompt's),
           i.e. what a user waits for; the row's K/V is stored in the cache after that.
  call_*:  the whole call, which also includes storing the finished row in the cache
           (the worst case for the overhead: a call that generates one token).
  gen_*:   whole calls generating --gen-tokens tokens (a typical call), miss and cold only.
miss_overhead = cold / miss - 1 on TTFT, call_/gen_miss_overhead the same on whole calls.
--compile runs every call with compile=True (static cache + CUDA graphs: a hit's suffix
runs as one graph replay, padded to 32/64/128/256 tokens).

    python -m benchmarks.prefix_bench --device cuda --model 1b --out DIR
    python -m benchmarks.prefix_bench                      # CPU, bundled default model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import specdec
from specdec import hit_policy
from specdec.prefix_cache import PrefixCache

from . import report, workloads


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _FirstToken:
    """Streamer noting when the first new token arrives (the first put after the prompt's)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def timed(model, ids, device, cache=None, new_tokens: int = 1, compile: bool = False) -> tuple[float, float]:
    """(seconds to the first new token, seconds for the whole call) of generate(max_new_tokens=new_tokens)."""
    streamer = _FirstToken()
    _sync(device)
    start = time.perf_counter()
    specdec.generate(model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, prefix_cache=cache,
                     streamer=streamer, compile=compile)
    _sync(device)
    return streamer.at - start, time.perf_counter() - start


def ttft(model, ids, device, cache=None) -> float:
    return timed(model, ids, device, cache)[0]


def text_ids(tok, n_tokens: int, vocab: int) -> list[int]:
    if tok is None:  # random-weight model: token ids of no language
        g = torch.Generator().manual_seed(0)
        return torch.randint(10, vocab, (n_tokens,), generator=g).tolist()
    text = " ".join(p.messages[-1]["content"] for p in workloads.get_workload("long").prompts)
    ids = tok(text, add_special_tokens=False).input_ids
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def measure_length(model, tok, length: int, device, repeats: int, gen_tokens: int = 0, compile: bool = False) -> dict:
    vocab = model.get_input_embeddings().weight.shape[0]
    prefix = text_ids(tok, length, vocab)
    questions = [text_ids(None, 16 + i, vocab)[-16:] for i in range(repeats + 1)]
    make = lambda q: torch.tensor([prefix + q], device=device)  # noqa: E731
    miss, cold, hit, auto, gen_miss, gen_cold = [], [], [], [], [], []
    cache, auto_cache = PrefixCache(max_bytes=8 << 30, min_hit_tokens=0), PrefixCache(max_bytes=8 << 30)
    for c in (cache, auto_cache):
        timed(model, make(questions[0]), device, c, compile=compile)
        timed(model, make(questions[0]), device, c, compile=compile)          # graphs of this suffix size
    timed(model, make(questions[0]), device, PrefixCache(max_bytes=8 << 30), compile=compile)
    for q in questions[1:]:                  # interleaved, so machine noise hits all four alike
        miss.append(timed(model, make(q), device, compile=compile))
        cold.append(timed(model, make(q), device, PrefixCache(max_bytes=8 << 30), compile=compile))
        hit.append(timed(model, make(q), device, cache, compile=compile))
        auto.append(timed(model, make(q), device, auto_cache, compile=compile)[0])
        if gen_tokens:
            gen_miss.append(timed(model, make(q), device, None, gen_tokens, compile)[1])
            gen_cold.append(timed(model, make(q), device, PrefixCache(max_bytes=8 << 30), gen_tokens, compile)[1])
    start = time.perf_counter()
    with cache.match(prefix + questions[1], model=model) as m:      # the model's identity joins every key
        matched = m.num_tokens
    match_ms = 1e3 * (time.perf_counter() - start)
    (tm, cm), (tc, cc), (th, ch) = ([statistics.median(t[i] for t in runs) for i in (0, 1)]
                                    for runs in (miss, cold, hit))
    row = dict(shared_tokens=length, prompt_tokens=length + 16, ttft_miss_ms=1e3 * tm,
               ttft_cold_ms=1e3 * tc, ttft_hit_ms=1e3 * th, call_miss_ms=1e3 * cm, call_cold_ms=1e3 * cc,
               call_hit_ms=1e3 * ch, matched_tokens=matched, hit_speedup=tm / th, miss_overhead=tc / tm - 1,
               call_hit_speedup=cm / ch, call_miss_overhead=cc / cm - 1, match_ms=match_ms,
               miss_match_ms=_miss_match_ms(cache, prefix, vocab, model), cache_bytes=cache.nbytes,
               ttft_auto_ms=1e3 * statistics.median(auto), auto_speedup=tm / statistics.median(auto),
               auto_min_hit_tokens=learned_threshold(model, compile, auto_cache))
    if gen_tokens:
        gm, gc = statistics.median(gen_miss), statistics.median(gen_cold)
        row.update(gen_tokens=gen_tokens, gen_miss_ms=1e3 * gm, gen_cold_ms=1e3 * gc, gen_miss_overhead=gc / gm - 1)
    return row


def learned_threshold(model, compile: bool, cache) -> int | None:
    """The ``min_hit_tokens`` the default cache uses now for a batch of 1 (None: no hit at all)."""
    tokens = hit_policy.threshold(model, hit_policy.path("graphs" if compile else None, None, 1, False), cache)
    return None if tokens >= hit_policy.NEVER else tokens


def _miss_match_ms(cache, prefix: list[int], vocab: int, model) -> float:
    """Time of a match() that finds nothing (a prompt as long as ``prefix``, another first block)."""
    other = [(prefix[0] + 1) % vocab] + prefix[1:]
    start = time.perf_counter()
    cache.match(other, model=model).release()
    return 1e3 * (time.perf_counter() - start)


TINY_KV = (2, 1, 4)   # --tiny-kv: layers, heads, head_dim (fp32): the copy is negligible, what's left is host work


def cache_op_times(model, lengths: list[int], device, repeats: int = 20, tiny: bool = False) -> list[dict]:
    """Milliseconds of the cache's own work for one prompt of each length, no model forward:
    insert (K/V shaped like ``model``'s, zeros; ``tiny``: TINY_KV-shaped, fp32), a lookup that hits
    every block, one that misses at block 0. Minimum over ``repeats`` (the cost without machine
    noise); ``insert_us_per_block`` is insert_ms per 16-token block."""
    if tiny:
        layers, (_, heads, dim), dtype = TINY_KV[0], TINY_KV, torch.float32
    else:
        config = model.config.get_text_config()
        heads = config.num_key_value_heads or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype, layers = model.get_input_embeddings().weight.dtype, config.num_hidden_layers
    rows = []
    for n in lengths:
        kv = [(torch.zeros(1, heads, n, dim, dtype=dtype, device=device),) * 2
              for _ in range(layers)]
        ids = torch.arange(n) % 1000
        other = ids.clone()
        other[0] += 1
        times = {"insert_ms": [], "hit_match_ms": [], "miss_match_ms": []}
        for _ in range(repeats):
            cache = PrefixCache(max_bytes=16 << 30)
            _sync(device)
            t0 = time.perf_counter()
            cache.insert(ids, kv)
            _sync(device)
            t1 = time.perf_counter()
            cache.match(ids).release()
            t2 = time.perf_counter()
            cache.match(other).release()
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(1e3 * dt)
        row = dict(tokens=n, blocks=n // 16, **{k: min(v) for k, v in times.items()})
        row["insert_us_per_block"] = 1e3 * row["insert_ms"] / max(n // 16, 1)
        rows.append(row)
    return rows


def load(name: str, device: str, dtype: str):
    if name == "default":
        from specdec.integrations.models import load_default

        return load_default(dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96),
              "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
              "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)}
    config = LlamaConfig(**shapes[name], max_position_embeddings=16384)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (bundled SmolLM2-135M), '1b' or '8b' (random Llama of that shape), 'tiny' (smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--lengths", default="512,2048,8192", help="shared prefix lengths in tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens per call for the gen_* timings (0: skip)")
    p.add_argument("--compile", action="store_true", help="compile=True for every call (CUDA graphs on GPU)")
    p.add_argument("--ops-only", action="store_true",
                   help="only time the cache's own work (insert, hit and miss lookups) per length, no forwards")
    p.add_argument("--tiny-kv", action="store_true",
                   help="with --ops-only: K/V of %d layers, %d head, head_dim %d, fp32 instead of the model's "
                        "(no model is loaded): the cache's host time alone" % TINY_KV)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.ops_only and args.tiny_kv:
        model, tok, args.model, dtype = None, None, "tiny-kv", "float32"
    else:
        model, tok = load(args.model, args.device, dtype)
    if args.ops_only:
        rows = cache_op_times(model, [int(n) for n in args.lengths.split(",")], args.device, tiny=args.tiny_kv)
        result = dict(environment=report.environment(), model=args.model, dtype=dtype, device=args.device,
                      command="python -m benchmarks.prefix_bench " + " ".join(sys.argv[1:] if argv is None else argv),
                      cache_ops=rows)
        report.write_json(result, Path(args.out) / f"prefix-ops-{report.device_slug(result['environment'])}-{args.model}.json")
        for r in rows:
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        return result
    timed(model, torch.tensor([[5, 6, 7, 8]], device=args.device), args.device, compile=args.compile)  # warm-up
    rows = [measure_length(model, tok, int(n), args.device, args.repeats, args.gen_tokens, args.compile)
            for n in args.lengths.split(",")]
    result = dict(environment=report.environment(), model=args.model, dtype=dtype, device=args.device,
                  compile=args.compile,
                  command="python -m benchmarks.prefix_bench " + " ".join(sys.argv[1:] if argv is None else argv),
                  rows=rows)
    name = f"prefix-{report.device_slug(result['environment'])}-{args.model}{'-compile' if args.compile else ''}.json"
    report.write_json(result, Path(args.out) / name)
    for r in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    return result


if __name__ == "__main__":
    main()
