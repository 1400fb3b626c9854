"""What one decode step costs, eager vs CUDA graphs, and what that does to decode speed.

Random-weight Llamas built from configs (no downloads): a SmolLM2-135M shape and a
Llama-3.2-1B shape, bf16 on the GPU. For each shape:

- ms per forward of q = 1 and q = 5 tokens over a 64-token cache: eager ``ModelRunner``
  (DynamicCache), the static cache run eagerly, and the static cache through CUDA graphs;
- decode tokens/s of ``specdec.generate(compile=False/True)`` with no draft, with
  ``draft_model=model`` (draft == target, k = 4: every draft accepted, 5 tokens per verify)
  and with prompt lookup, batch 1, greedy, 128 new tokens; plus HF ``generate()``;
- agreement of compile=True with compile=False greedy outputs (bf16: fraction of equal
  tokens; fp32 on the 135M shape: must be identical).

    python benchmarks/step_profile.py --out DIR     # writes DIR/step_profile.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

import specdec  # noqa: E402
from specdec import static  # noqa: E402
from specdec.adapter import ModelRunner, crop  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=8192, rope_theta=500000.0),
}


def build(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    config = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_times(model, device, prompt_len: int, reps: int) -> dict:
    """ms per forward of q tokens after a prompt_len-token prefill (the cache is cropped back each time)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, V, (1, prompt_len), generator=g).to(device)
    ones = torch.ones(1, prompt_len, dtype=torch.long, device=device)
    positions = torch.arange(prompt_len, device=device)[None]
    out = {}
    runners = {"eager": ModelRunner(model),
               "static_eager": static.StaticRunner(model, 1, 1024, use_graphs=False),
               "graph": static.StaticRunner(model, 1, 1024, use_graphs=device == "cuda")}
    for name, runner in runners.items():
        cache = runner.new_cache()
        runner.forward(prompt, ones, positions, cache, last_only=True)
        for q in (1, 5):
            tokens = torch.randint(3, V, (1, q), generator=g).to(device)
            mask = torch.ones(1, prompt_len + q, dtype=torch.long, device=device)
            pos = prompt_len + torch.arange(q, device=device)[None]

            def one():
                runner.forward(tokens, mask, pos, cache)
                crop(cache, prompt_len)

            out[f"{name}_q{q}_ms"] = round(median_ms(one, reps), 3)
    return out


def decode(model, ids, new_tokens: int, compile: bool, **kw) -> tuple[torch.Tensor, dict]:
    specdec.generate(model, ids, max_new_tokens=8, compile=compile, **kw)  # warm-up (graph captures)
    sync()
    t0 = time.perf_counter()
    out, stats = specdec.generate(model, ids, max_new_tokens=new_tokens, compile=compile, return_stats=True, **kw)
    sync()
    dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return out, dict(tokens_per_s=round(n / dt, 1), ms_per_token=round(dt / n * 1e3, 2), new_tokens=n,
                     target_forwards=stats.target_forwards, acceptance=round(stats.acceptance_rate, 3))


def agreement(a: torch.Tensor, b: torch.Tensor, start: int) -> dict:
    x, y = a[0, start:].tolist(), b[0, start:].tolist()
    n = min(len(x), len(y))
    first = next((i for i in range(n) if x[i] != y[i]), None)
    return dict(equal_fraction=round(sum(p == q for p, q in zip(x, y)) / max(n, 1), 4),
                first_mismatch=first, identical=(x == y))


def prompt_ids(model, device, length: int = 64) -> torch.Tensor:
    # a repetitive prompt, so prompt lookup finds matches as it would in code / quoting workloads
    g = torch.Generator().manual_seed(1)
    chunk = torch.randint(3, model.config.vocab_size, (16,), generator=g)
    return chunk.repeat(length // 16)[None].to(device)


DRAFTERS = {"none": lambda m: {}, "self_draft_k4": lambda m: dict(draft_model=m, num_draft_tokens=4),
            "prompt_lookup": lambda m: dict(prompt_lookup_num_tokens=4)}


def profile_shape(shape: str, device: str, args, result: dict, save) -> None:
    entry = result.setdefault("shapes", {}).setdefault(shape, {"config": SHAPES[shape]})
    model = build(shape, torch.bfloat16, device)
    entry["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    try:
        entry["step_ms"] = step_times(model, device, 64, args.reps)
    except Exception:  # noqa: BLE001
        entry["step_ms_error"] = traceback.format_exc()
    print(shape, "step_ms", entry.get("step_ms"), flush=True)
    save()
    ids = prompt_ids(model, device)
    try:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                do_sample=False)
        sync()
        dt = time.perf_counter() - t0
        entry["hf_generate"] = dict(tokens_per_s=round(args.new_tokens / dt, 1),
                                    ms_per_token=round(dt / args.new_tokens * 1e3, 2))
    except Exception:  # noqa: BLE001
        entry["hf_generate_error"] = traceback.format_exc()
    decode_rows = entry.setdefault("decode", {})
    for name, kw in DRAFTERS.items():
        row = decode_rows.setdefault(name, {})
        outs = {}
        for compile in (False, True):
            try:
                outs[compile], row["compile" if compile else "eager"] = decode(model, ids, args.new_tokens,
                                                                             compile, **kw(model))
            except Exception:  # noqa: BLE001
                row[f"error_compile_{compile}"] = traceback.format_exc()
        if len(outs) == 2:
            row["speedup"] = round(row["compile"]["tokens_per_s"] / row["eager"]["tokens_per_s"], 2)
            row["agreement_bf16"] = agreement(outs[False], outs[True], ids.shape[1])
        print(shape, name, row, flush=True)
        save()
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def fp32_check(device: str, args, result: dict) -> None:
    """compile=True vs False in fp32 on the 135M shape: greedy outputs must be identical."""
    model = build("smollm2-135m", torch.float32, device)
    ids = prompt_ids(model, device)
    rows = {}
    for name, kw in DRAFTERS.items():
        outs = [specdec.generate(model, ids, max_new_tokens=args.new_tokens, compile=c, **kw(model))
                for c in (False, True)]
        rows[name] = agreement(outs[0], outs[1], ids.shape[1])
    result["fp32_smollm2_135m"] = rows
    print("fp32", rows, flush=True)
    del model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for step_profile.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-fp32", action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import StaticCache

    result = dict(
        device=torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                      cuda=torch.version.cuda),
        static_cache_signature=str(inspect.signature(StaticCache.__init__)),
        config=dict(batch=1, greedy=True, new_tokens=args.new_tokens, prompt_tokens=64, reps=args.reps,
                    dtype="bfloat16", weights="random (from config)", step_cache_tokens=64, graph_max_len=1024),
    )
    print(json.dumps({k: result[k] for k in ("device", "versions", "static_cache_signature")}), flush=True)

    def save():
        result["graph_captures"] = static.captures
        (out_dir / "step_profile.json").write_text(json.dumps(result, indent=1))

    for shape in args.shapes.split(","):
        profile_shape(shape, device, args, result, save)
    if not args.skip_fp32:
        try:
            fp32_check(device, args, result)
        except Exception:  # noqa: BLE001
            result["fp32_error"] = traceback.format_exc()
    save()
    print("\nshape          step ms (eager/static/graph) q=1 | q=5      decode tok/s eager -> compile")
    for shape, e in result.get("shapes", {}).items():
        s = e.get("step_ms", {})
        q1 = "/".join(str(s.get(f"{n}_q1_ms")) for n in ("eager", "static_eager", "graph"))
        q5 = "/".join(str(s.get(f"{n}_q5_ms")) for n in ("eager", "static_eager", "graph"))
        dec = "  ".join(f"{n}: {r.get('eager', {}).get('tokens_per_s')}->{r.get('compile', {}).get('tokens_per_s')}"
                        for n, r in e.get("decode", {}).items())
        print(f"{shape:14} {q1} | {q5}   {dec}")
    print("fp32 identical:", {k: v["identical"] for k, v in result.get("fp32_smollm2_135m", {}).items()})


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
