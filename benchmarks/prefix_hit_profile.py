"""Host time of a prefix-cache hit, phase by phase, next to a miss, as the shared prefix grows.

A random Llama small enough that its forwards cost little (2 layers, hidden 32, 4 heads of 8 dims
sharing one K/V head: 128 bytes of K/V per token), so what grows with the prefix is the host work
around them: the lookup, handing the hit's K/V to the run's cache, anything done per block. For each prefix length and path (eager, ``compile=True``;
on a CPU the latter runs the static cache without graphs), prompt = the prefix + a 16-token suffix
that changes per call, ``generate(max_new_tokens=1)``:

  miss_ms   time to the first token without a cache (median)
  hit_ms    the same with a cache holding the prefix (``min_hit_tokens=0``: every hit used)
  phases    host milliseconds of a hit, medians over calls, each phase net of the phases inside it:
            before (generate() up to the prefill), lookup (``prefill.match_rows``), gather (the hit's K/V
            for the run: ``gather_rows``), load (into the run's cache: ``load_hit``), suffix (the suffix
            forward), prefill_other
            (the rest of the prefill), first_token (from the prefill to the first token), store
            (after the first token: the finished row stored)
  hit_host_ms  the phases up to the first token but the suffix forward: the hit's own host work
  hit_ops   aten ops each phase dispatches, views left out (outside_prefill: before + first_token):
            on a GPU each is about one kernel launch

On a GPU the phases are host time (no synchronisation inside a call): what a launch-bound hit pays.

    python -m benchmarks.prefix_hit_profile                                   # CPU, tiny model
    python -m benchmarks.prefix_hit_profile --device cuda --model default --lengths 2048,8192
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import specdec
from specdec import adapter, prefill, static
from specdec.prefix_cache import PrefixCache

from . import report
from .prefix_bench import load

SUFFIX = 16
BEFORE, FIRST, STORE = "before", "first_token", "store"


def hooks() -> list[tuple[object, str, str]]:
    """(owner, attribute, phase): the functions whose calls make up each phase of a hit."""
    return [(prefill, "prefill_with_prefix_cache", "prefill_other"),
            (prefill, "match_rows", "lookup"),
            (prefill, "gather_rows", "gather"),
            (prefill, "load_hit", "load"),
            (adapter.ModelRunner, "forward", "suffix"),
            (static.StaticRunner, "forward", "suffix"),
            (prefill, "store_rows", STORE)]


class Phases:
    """Accumulates each phase's own time (net of the phases nested in it) and its aten ops."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.ops: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []          # [phase, start, seconds of nested phases]
        self.first_start: float | None = None
        self.last_end: float | None = None

    @property
    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "outside"

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        if phase == "prefill_other" and self.first_start is None:
            self.first_start = now
        self.stack.append([phase, now, 0.0])

    def leave(self) -> None:
        phase, start, nested = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[phase] += elapsed - nested
        if self.stack:
            self.stack[-1][2] += elapsed
        if phase == "prefill_other":
            self.last_end = start + elapsed


def _wrapped(fn, phase: str, phases_of):
    def timed(*args, **kwargs):
        phases = phases_of()
        if phases is None:
            return fn(*args, **kwargs)
        phases.enter(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            phases.leave()
    return timed


@contextlib.contextmanager
def instrumented():
    """Inside: ``box[0] = Phases()`` makes the hooked functions report into it (None: they don't)."""
    box: list[Phases | None] = [None]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in hooks()]
    try:
        for owner, name, phase in hooks():
            setattr(owner, name, _wrapped(getattr(owner, name), phase, lambda: box[0]))
        yield box
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that are not views, per the current phase of ``box[0]``."""

    def __init__(self, box) -> None:
        super().__init__()
        self.box = box

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and self.box[0] is not None:
            self.box[0].ops[self.box[0].current] += 1
        return func(*args, **(kwargs or {}))


class FirstToken:
    """Streamer noting when the first new token arrives (its second put: the first is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def call(model, ids, device: str, cache, compile: bool, box=None, phases: Phases | None = None) -> dict:
    """One ``generate(max_new_tokens=1)``: TTFT and whole-call ms; with ``phases``, its host phases."""
    streamer = FirstToken()
    _sync(device)
    if box is not None:
        box[0] = phases
    start = time.perf_counter()
    try:
        specdec.generate(model, ids, max_new_tokens=1, min_new_tokens=1, prefix_cache=cache, streamer=streamer,
                         compile=compile)
        _sync(device)
    finally:
        if box is not None:
            box[0] = None
    end = time.perf_counter()
    out = dict(ttft_ms=1e3 * (streamer.at - start), call_ms=1e3 * (end - start))
    if phases is not None and phases.first_start is not None:
        phases.seconds[BEFORE] = phases.first_start - start
        phases.seconds[FIRST] = streamer.at - phases.last_end
    return out


def measure(model, length: int, device: str, repeats: int, miss_repeats: int, compile: bool) -> dict:
    """One row: miss and hit TTFT, and the hit's phases, for one prefix length and path."""
    vocab = model.get_input_embeddings().weight.shape[0]
    config = model.config.get_text_config()
    length = min(length, (getattr(config, "max_position_embeddings", None) or 1 << 30) - SUFFIX - 2)
    gen = torch.Generator().manual_seed(length)
    prefix = torch.randint(3, vocab, (1, length), generator=gen)
    suffixes = [torch.randint(3, vocab, (1, SUFFIX), generator=gen) for _ in range(repeats + miss_repeats + 3)]
    make = lambda i: torch.cat([prefix, suffixes[i]], dim=1).to(device)  # noqa: E731
    cache = PrefixCache(max_bytes=16 << 30, min_hit_tokens=0)
    for i in (0, 1):                            # store the prefix; warm up this suffix size (graphs)
        call(model, make(i), device, cache, compile)
    call(model, make(0), device, None, compile)
    hits, misses, runs = [], [], []
    with instrumented() as box:
        for i in range(repeats):
            phases = Phases()
            hits.append(call(model, make(2 + i), device, cache, compile, box, phases))
            runs.append(phases)
        counted = Phases()
        with OpCounter(box):
            call(model, make(2 + repeats), device, cache, compile, box, counted)
    for i in range(miss_repeats):
        misses.append(call(model, make(3 + repeats + i), device, None, compile))
    names = [BEFORE, "lookup", "gather", "load", "suffix", "prefill_other", FIRST, STORE]
    phase_ms = {n: 1e3 * statistics.median(p.seconds.get(n, 0.0) for p in runs) for n in names}
    row = dict(prefix_tokens=length, blocks=length // cache.block_size, compile=compile,
               miss_ms=statistics.median(m["ttft_ms"] for m in misses) if misses else None,
               hit_ms=statistics.median(h["ttft_ms"] for h in hits),
               hit_call_ms=statistics.median(h["call_ms"] for h in hits),
               hit_phases_ms=phase_ms, hit_ops={n: counted.ops.get(n, 0) for n in names if n not in (BEFORE, FIRST)} | {
                   "outside_prefill": counted.ops.get("outside", 0)},
               hit_cached_tokens=cache.stats.hit_tokens // max(cache.stats.hits, 1))
    row["hit_speedup"] = row["miss_ms"] / row["hit_ms"] if misses else None
    row["hit_host_ms"] = sum(v for k, v in phase_ms.items() if k not in ("suffix", STORE))
    return row


def tiny_llama(layers: int, hidden: int, positions: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=96,
                         max_position_embeddings=positions)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny", help="'tiny' (random Llama, --layers/--hidden) or what "
                   "benchmarks.prefix_bench loads: 'default' (SmolLM2-135M), '1b', '8b'")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA (not for 'tiny')")
    p.add_argument("--lengths", default="512,2048,8192,32768", help="shared prefix lengths in tokens")
    p.add_argument("--modes", default="eager,compile", help="eager and/or compile (compile=True)")
    p.add_argument("--repeats", type=int, default=7, help="timed hits per row")
    p.add_argument("--miss-repeats", type=int, default=3, help="timed misses per row (0: skip misses)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady numbers on a shared CPU)")
    p.add_argument("--out", default="benchmarks/results/cpu/prefix-hit-host-time-tiny-cpu.json",
                   help="JSON file to write")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    lengths = [int(n) for n in args.lengths.split(",")]
    if not modes or set(modes) - {"eager", "compile"} or args.repeats < 1 or args.miss_repeats < 0:
        p.error("--modes takes eager and/or compile, --repeats >= 1, --miss-repeats >= 0")
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model, dtype = tiny_llama(args.layers, args.hidden, max(lengths) + 2 * SUFFIX, args.device), "float32"
    else:
        dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        model, _ = load(args.model, args.device, dtype)
    call(model, torch.tensor([[5, 6, 7, 8]], device=args.device), args.device, None, False)   # warm-up
    rows = []
    for mode in modes:
        for n in lengths:
            rows.append(measure(model, n, args.device, args.repeats, args.miss_repeats, mode == "compile"))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()
                   if k not in ("hit_phases_ms", "hit_ops")})
            print("   ", {k: round(v, 3) for k, v in rows[-1]["hit_phases_ms"].items()})
    config = model.config
    result = dict(environment=report.environment(), device=args.device, dtype=dtype,
                  model=dict(name=args.model, layers=config.num_hidden_layers, hidden=config.hidden_size),
                  suffix_tokens=SUFFIX, repeats=args.repeats, miss_repeats=args.miss_repeats,
                  command="python -m benchmarks.prefix_hit_profile " + " ".join(sys.argv[1:] if argv is None else argv),
                  rows=rows)
    report.write_json(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
