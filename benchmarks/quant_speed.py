"""Batch-1 decode speed of bf16 vs int8 vs int4 weights, against the memory-bandwidth roofline.

GPU only (a CPU run says nothing about HBM): builds Llama-3.2-1B- and Llama-3-8B-shaped
models with random bf16 weights directly on the device (no downloads), measures copy
bandwidth in the same run, times a fixed number of decode steps after warm-up (CUDA-
synchronized), and records KV-cache bytes at ``--kv-context`` tokens for bf16 vs
QuantizedKVCache int8/int4. Each variant runs in its own try/except: a failure is recorded
in the JSON and the others still run. ``--tiny --device cpu`` smoke-tests the logic.

    python -m benchmarks.quant_speed --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

SHAPES = {  # LlamaConfig kwargs
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}
WEIGHTS = {"bf16": None, "int8": (8, None), "int4": (4, None)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn``, synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    del src, dst
    return 2 * nbytes / seconds


def build_model(shape: str, device: torch.device, seed: int = 0):
    """A random bf16 Llama of the given shape, created directly on ``device``."""
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=16384)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def decode_bytes(model) -> int:
    """Bytes of weights one decode step reads: everything but the input embedding table (one row read),
    unless it is tied to the output head."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = getattr(head, "weight", None) is emb
    return total if tied else total - emb.numel() * emb.element_size()


@torch.inference_mode()
def decode_speed(model, device: torch.device, prompt: int, warmup: int, steps: int, make_cache=None) -> dict:
    """Greedy batch-1 decode with a cache: seconds per step over ``steps`` after ``warmup``."""
    make_cache = make_cache or (lambda: transformers.DynamicCache(config=model.config))
    cache = make_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def step():
        nonlocal tok
        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    for _ in range(warmup):
        step()
    seconds = timed(step, device, repeats=steps)
    kv = cache.nbytes() if hasattr(cache, "nbytes") else _dynamic_kv_bytes(cache)
    return {"seconds_per_step": seconds, "tokens_per_s": 1 / seconds, "kv_bytes_end": kv}


def _dynamic_kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def run_weights(shape: str, variant: str, args, device: torch.device, bandwidth: float) -> dict:
    from specdec.quant import quantize

    model = build_model(shape, device)
    t0 = time.perf_counter()
    if WEIGHTS[variant] is not None:
        quantize(model, bits=WEIGHTS[variant][0], group_size=args.group_size, backend=args.backend)
    sync(device)
    row = {"quantize_seconds": round(time.perf_counter() - t0, 2)}
    row["backends"] = sorted({m.backend for m in model.modules() if hasattr(m, "backend")}) or ["bf16"]
    row["weight_bytes_per_step"] = decode_bytes(model)
    if args.compile != "none":
        model.forward = torch.compile(model.forward, mode=args.compile, dynamic=True)
    row.update(decode_speed(model, device, args.prompt, args.warmup, args.steps))
    step_bytes = row["weight_bytes_per_step"] + row["kv_bytes_end"]
    row["roofline_tokens_per_s"] = bandwidth / step_bytes
    row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
    del model
    return row


def kv_bytes(shape: str, context: int, device: torch.device) -> dict:
    """KV-cache bytes at ``context`` tokens: bf16 DynamicCache vs QuantizedKVCache int8/int4 (random K/V)."""
    from specdec.quant import QuantizedKVCache

    config = transformers.LlamaConfig(**SHAPES[shape])
    head_dim = config.hidden_size // config.num_attention_heads
    shape_kv = (1, config.num_key_value_heads, context, head_dim)
    out = {"bf16": 2 * config.num_hidden_layers * torch.Size(shape_kv).numel() * 2}
    for bits in (8, 4):
        cache = QuantizedKVCache(config, bits=bits)
        for layer in range(config.num_hidden_layers):
            k = torch.randn(shape_kv, dtype=torch.bfloat16, device=device)
            cache.update(k, torch.randn_like(k), layer)
        out[f"int{bits}"] = cache.nbytes()
        out[f"int{bits}_ratio"] = out[f"int{bits}"] / out["bf16"]
        del cache
    return out


def kv_decode(shape: str, args, device: torch.device) -> dict:
    """Decode speed at ``--kv-context`` tokens of context with each KV cache (bf16 weights)."""
    from specdec.quant import QuantizedKVCache

    model = build_model(shape, device)
    out = {}
    caches = {"bf16": None, "int8": lambda: QuantizedKVCache(model.config, bits=8),
              "int4": lambda: QuantizedKVCache(model.config, bits=4)}
    for name, make in caches.items():
        out[name] = _guard(lambda: decode_speed(model, device, args.kv_context, 2, args.kv_steps, make))
    del model
    return out


def _guard(fn) -> dict:
    try:
        return fn()
    except Exception as err:  # record and go on: one failing variant must not lose the rest
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for quant-speed-<device>.json")
    p.add_argument("--sizes", nargs="+", default=["1b", "8b"], choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument("--backend", default="auto", help="quantize() backend")
    p.add_argument("--compile", default="none", choices=["none", "max-autotune-no-cudagraphs", "reduce-overhead"],
                   help="torch.compile mode for the model forward (off by default)")
    p.add_argument("--kv-context", type=int, default=8192, help="context for the KV-cache measurements")
    p.add_argument("--kv-steps", type=int, default=16, help="timed decode steps at --kv-context")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes per copy for the bandwidth test")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and counts: a logic smoke test (CPU ok)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.steps, args.warmup, args.prompt = ["tiny"], 3, 1, 8
        args.kv_context, args.kv_steps, args.copy_bytes = 256, 2, 16 << 20
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("quant_speed.py measures GPU decode against HBM bandwidth and needs CUDA "
                         "(use --tiny --device cpu only to smoke-test the script)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quant_speed.py needs a CUDA GPU: torch.cuda.is_available() is False")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    report = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "copy_bandwidth_GBps": bandwidth / 1e9, "settings": {k: v for k, v in vars(args).items()},
              "command": " ".join([sys.executable, *sys.argv]), "decode": {}, "kv_cache_bytes": {}, "kv_decode": {}}
    out = Path(args.out) / f"quant-speed-{_slug(name)}{'-tiny' if args.tiny else ''}.json"
    for shape in args.sizes:
        report["decode"][shape] = {}
        for variant in args.variants:
            row = _guard(lambda: run_weights(shape, variant, args, device, bandwidth))
            report["decode"][shape][variant] = row
            print(shape, variant, {k: v for k, v in row.items() if k != "traceback"}, flush=True)
            _write(out, report)
        report["kv_cache_bytes"][shape] = _guard(lambda: kv_bytes(shape, args.kv_context, device))
    report["kv_decode"][args.sizes[0]] = _guard(lambda: kv_decode(args.sizes[0], args, device))
    _write(out, report)
    print(f"wrote {out}", flush=True)
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
