"""Batch-1 bf16 decode against the HBM roofline: HF eager, HF static cache + compile, ours eager, ours graphs.

Random-weight Llamas built from configs (no downloads), on one GPU: the SmolLM2-135M shape,
a Llama-3.2-1B shape and a Llama-3-8B shape. For each, greedy decode of ``--new`` tokens
after a ``--prompt``-token prompt, timed as decode only (the time of a 1-token call,
i.e. prefill + first token, is subtracted):

- ``hf-eager``: ``model.generate()`` (DynamicCache);
- ``hf-static-compile``: ``model.generate(cache_implementation="static")``, which
  torch.compiles the decode step; the first call (compilation) is timed separately;
- ``ours-eager`` / ``ours-graphs`` / ``ours-inductor``: ``specdec.generate()`` plain
  decoding with ``compile=False``, ``True`` (static cache + CUDA graphs) and
  ``"inductor"`` (the same with torch.compile-fused kernels inside the graphs).

Roofline: bytes one step reads (weights, counting a tied embedding once, plus the KV
cache at the mean decode length) over the device-to-device copy bandwidth measured in the
same run. Outputs are checked against ``hf-eager`` (bf16: fraction of equal tokens).

    python -m benchmarks.roofline --out DIR      # writes DIR/roofline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

import specdec

from . import report
from .quant_speed import copy_bandwidth, decode_bytes

SHAPES = {
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
}


VARIANTS = ["hf-eager", "hf-static-compile", "ours-eager", "ours-graphs", "ours-inductor"]


def build(shape: str, seed: int = 0):
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def kv_bytes_per_token(config) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2   # K and V, bf16


def timed(fn) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def decode_rate(call, new: int, reps: int) -> tuple[dict, torch.Tensor]:
    """Decode tokens/s of ``call(n)``: (new - 1) tokens over t(new) - t(1), best of ``reps``."""
    first = min(timed(lambda: call(1))[0] for _ in range(reps))
    runs = [timed(lambda: call(new)) for _ in range(reps)]
    total, out = min(runs, key=lambda r: r[0])
    seconds = (total - first) / (new - 1)
    return {"tokens_per_s": 1 / seconds, "ms_per_token": 1e3 * seconds, "first_call_s": first}, out


def run_shape(shape: str, args, bandwidth: float) -> dict:
    model = build(shape)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    step_bytes = decode_bytes(model) + kv_bytes_per_token(model.config) * (args.prompt + args.new // 2)
    row = {"config": SHAPES[shape], "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "bytes_per_step": step_bytes, "roofline_tokens_per_s": bandwidth / step_bytes, "variants": {}}
    hf = lambda n, **kw: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)  # noqa: E731
    calls = {
        "hf-eager": hf,
        "hf-static-compile": lambda n: hf(n, cache_implementation="static"),
        "ours-eager": lambda n: specdec.generate(model, ids, max_new_tokens=n, min_new_tokens=n),
        "ours-graphs": lambda n: specdec.generate(model, ids, max_new_tokens=n, min_new_tokens=n, compile=True),
        "ours-inductor": lambda n: specdec.generate(model, ids, max_new_tokens=n, min_new_tokens=n,
                                                    compile="inductor"),
    }
    calls = {name: call for name, call in calls.items() if name in args.variants}
    reference = None
    for name, call in calls.items():
        try:
            warm, _ = timed(lambda: call(args.new))          # compiles / captures graphs
            stats, out = decode_rate(call, args.new, args.reps)
        except Exception as error:  # noqa: BLE001  (a variant that fails is reported, not fatal)
            traceback.print_exc()
            row["variants"][name] = {"error": f"{type(error).__name__}: {error}"[:400]}
            continue
        stats["warmup_call_s"] = warm
        stats["roofline_fraction"] = stats["tokens_per_s"] / row["roofline_tokens_per_s"]
        new_tokens = out[0, args.prompt:]
        reference = new_tokens if reference is None else reference
        stats["agreement_with_hf_eager"] = float((new_tokens == reference).float().mean())
        row["variants"][name] = stats
        print(f"{shape:13s} {name:18s} {stats['tokens_per_s']:8.1f} tok/s  "
              f"{100 * stats['roofline_fraction']:5.1f}% of roofline  warm-up {warm:6.1f} s  "
              f"agree {stats['agreement_with_hf_eager']:.2f}", flush=True)
    base = row["variants"].get("hf-eager", {}).get("tokens_per_s")
    for stats in row["variants"].values():
        if base and "tokens_per_s" in stats:
            stats["speedup_vs_hf_eager"] = stats["tokens_per_s"] / base
    del model
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                   help="hf-eager first: the others' agreement is measured against the first variant run")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new", type=int, default=128, help="new tokens per timed call (default 128)")
    p.add_argument("--reps", type=int, default=2, help="timed calls per variant; the fastest counts (default 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="roofline.json", help="file name under --out")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="torch._inductor.config.coordinate_descent_tuning = True (as gpt-fast sets it)")
    args = p.parse_args(argv)
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    bandwidth = copy_bandwidth(torch.device("cuda"), 1 << 30)
    command = "python -m benchmarks.roofline " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"environment": report.environment(), "command": command,
              "settings": {"batch": 1, "dtype": "bfloat16", "greedy": True, "prompt_tokens": args.prompt,
                           "new_tokens": args.new, "reps": args.reps,
                           "coordinate_descent_tuning": args.coordinate_descent, "weights": "random (from config)"},
              "copy_bandwidth_GBps": bandwidth / 1e9, "shapes": {}}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    for shape in args.shapes:
        result["shapes"][shape] = run_shape(shape, args, bandwidth)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / args.name).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
