"""int8 / int4 weight-only quantization on the compiled decoding path, against each variant's roofline.

Measures batch-1 greedy ``specdec.generate(model, ids, compile=...)`` (no draft: plain decoding over
the static KV cache, with CUDA graphs for ``compile=True``, plus ``torch.compile`` fusion for
``"inductor"``) on a random Llama-3-8B-shaped model, for bf16 weights and the same weights quantized by
``quant.quantize`` to int8 (per channel) and int4 (group-wise), with ``--backend`` (default ``auto``:
the fastest kernel per layer shape), or with the backend a variant names (``int4:triton``). Each row
says which backend its layers use (``backend``) and how many sibling groups the static path joined
(``joined_groups``; tinygemm layers are never joined). For each
(weight variant, path) row: tokens/s making exactly ``--new-tokens`` tokens (median of ``--repeats``
synchronized calls after a warm-up call that captures the graphs), the decode-only rate (a 1-token
call's time subtracted), the weight bytes one decode step reads, the roofline tokens/s those bytes
allow at the copy bandwidth measured in the same run, and the greedy agreement of the quantized
variants' tokens with the bf16 variant's tokens (same seed, so int8/int4 quantize the very same bf16
weights; random weights give nearly flat logits, so agreement is a weak signal of quality here:
``benchmarks/quant_quality.py`` measures that on a real model).

Bytes per token (``bytes_per_token``): every parameter and buffer of the (quantized) model, as stored,
except the input embedding table (a step reads one row of it; it is counted if tied to the output
head). The output head stays bf16 (``quantize`` skips ``lm_head``). KV-cache reads (a few MB at these
lengths) are not counted. Each row runs in its own try/except (a failure is the row's ``error``), the
JSON is rewritten after every row, and rows not started by ``--deadline`` seconds are recorded as
skipped, so a 10-minute GPU call always leaves its file. No downloads: the weights are random, built on
the device.

    python -m benchmarks.quant_graphs --out benchmarks/results                   # one H100/H200, ~2-3 min
    python -m benchmarks.quant_graphs --shape tiny --device cpu --paths graphs eager --new-tokens 8 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from specdec.quant.int4 import GROUP_SIZES

from . import report
from .quant_speed import SHAPES, build_model, copy_bandwidth, decode_bytes, sync

VARIANTS = {"bf16": None, "int8": 8, "int4": 4}     # variant -> bits; "int8:<backend>" forces a backend
BACKENDS = {8: ("torch", "triton", "reference"), 4: ("tinygemm", "triton", "reference")}
VARIANT_CHOICES = [*VARIANTS, *(f"{v}:{b}" for v, bits in VARIANTS.items() if bits for b in BACKENDS[bits])]
PATHS = {"graphs": True, "inductor": "inductor", "eager": False}   # path -> generate(compile=...)
ROW_KEYS = ("variant", "path", "backend", "tok_s", "seconds", "decode_tok_s", "bytes_per_token", "roofline_tok_s",
            "roofline_fraction", "agreement_with_bf16", "error")   # in every row (None: not measured)
BYTES_NOTE = ("bytes_per_token: bytes of every parameter and buffer of the model as stored (quantized "
              "layers: codes + scales/zeros), minus the input embedding table (one row read per token) unless "
              "tied to the output head; lm_head stays bf16; KV-cache reads not counted")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=list(SHAPES), help="Llama shape (tiny: a smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANT_CHOICES,
                   help="bf16, int8, int4 (quantized with --backend), or int8:<backend> / int4:<backend>")
    p.add_argument("--paths", nargs="+", default=["graphs"], choices=list(PATHS),
                   help="graphs: compile=True; inductor: compile='inductor'; eager: compile=False")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens each timed call makes (exactly)")
    p.add_argument("--prompt", type=int, default=32, help="random prompt tokens (batch 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="int4 group size (what Int4Linear and tinygemm take)")
    p.add_argument("--warmup-tokens", type=int, default=16,
                   help="tokens of the untimed warm-up call (it captures the graphs / compiles)")
    p.add_argument("--backend", default="auto", help="quant.quantize backend of the int8 and int4 variants")
    p.add_argument("--copy-bytes", type=int, default=None,
                   help="bytes per copy for the bandwidth test (default 2 GiB on CUDA, 16 MiB elsewhere)")
    p.add_argument("--deadline", type=float, default=540.0,
                   help="seconds after start past which rows not begun are skipped (the JSON is still written)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="directory for quant-graphs-llama-<shape>-<device>.json")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt < 1:
        p.error("--new-tokens must be >= 2, --repeats and --prompt >= 1")
    if args.copy_bytes is None:
        args.copy_bytes = 2 << 30 if args.device.startswith("cuda") else 16 << 20
    return args


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def agreement(tokens: list[int], reference: list[int] | None) -> dict:
    """Greedy agreement with the reference tokens: overall (position by position) and up to the first
    divergence, as fractions of the reference length."""
    if reference is None or tokens is None:
        return {"agreement_with_bf16": None, "agreement_prefix_with_bf16": None, "first_divergence": None}
    n = len(reference)
    same = [a == b for a, b in zip(tokens, reference)] + [False] * (n - len(tokens))
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"agreement_with_bf16": sum(same) / n if n else None,
            "agreement_prefix_with_bf16": (n if first is None else first) / n if n else None,
            "first_divergence": first}


def runner_state(model) -> dict:
    """What the static path set up for ``model``: runners, whether they still use graphs, graphs captured,
    sibling projections joined."""
    from specdec import static
    from specdec.fused_linear import joined_groups

    return {**static.runners_of(model), "joined_groups": len(joined_groups(model))}


def variant_spec(variant: str, default_backend: str) -> tuple[int | None, str | None]:
    """``"int4:triton"`` -> (4, "triton"); ``"int8"`` -> (8, default_backend); ``"bf16"`` -> (None, None)."""
    name, _, backend = variant.partition(":")
    bits = VARIANTS[name]
    return bits, (backend or default_backend) if bits else None


def backend_used(model) -> str:
    """The backend of the model's quantized layers ("a+b" if several), or "bf16"."""
    found = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
    return "+".join(found) or "bf16"


def run_path(model, ids: torch.Tensor, path: str, args, device: torch.device) -> dict:
    """Warm up (graph capture / compile), then time the calls; returns the row's measurements + tokens."""
    import specdec
    from specdec import static

    compile_ = PATHS[path]
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, compile=compile_)
    prompt = ids.shape[1]

    def call(n: int) -> tuple[float, list[int]]:
        sync(device)
        t0 = time.perf_counter()
        out = specdec.generate(model, ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        seconds = time.perf_counter() - t0
        return seconds, out[0, prompt:].tolist()

    row = {}
    captures0 = static.captures
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the warm-up must land in the timed calls' cache-size bucket, or they would capture their own graphs
        warm = max(args.warmup_tokens, 1)
        if static.slot_bucket(prompt + warm + 2) != static.slot_bucket(prompt + args.new_tokens + 2):
            warm = args.new_tokens
        row["warmup_seconds"] = call(warm)[0]
        call(1)  # the 1-token call's shapes too (prefill only)
        captures1 = static.captures
        runs = [call(args.new_tokens) for _ in range(args.repeats)]
        firsts = [call(1)[0] for _ in range(args.repeats)]
    row["graphs_captured"] = static.captures - captures0
    row["graphs_captured_while_timed"] = static.captures - captures1   # should be 0
    if compile_:
        row.update(runner_state(model))
    row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught}) or None
    seconds = statistics.median(s for s, _ in runs)
    first = statistics.median(firsts)
    tokens = runs[0][1]
    if any(len(t) != args.new_tokens for _, t in runs):
        raise RuntimeError(f"a call made {[len(t) for _, t in runs]} tokens, not {args.new_tokens}")
    row.update(seconds=seconds, seconds_all=[s for s, _ in runs], tok_s=args.new_tokens / seconds,
               first_token_seconds=first, repeats_identical=all(t == tokens for _, t in runs))
    decode = seconds - first
    row["decode_tok_s"] = (args.new_tokens - 1) / decode if decode > 0 else None
    row["tokens"] = tokens
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quant_graphs needs a CUDA GPU for --device cuda (torch.cuda.is_available() is False); "
                         "--shape tiny --device cpu smoke-tests the script")
    env = report.environment()
    slug = report.device_slug(env) if device.type == "cuda" else "cpu"
    out = Path(args.out) / f"quant-graphs-llama-{args.shape}-{slug}.json"
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    free_memory()
    result = {"schema": 1, "environment": env,
              "command": "python -m benchmarks.quant_graphs " + " ".join(sys.argv[1:] if argv is None else argv),
              "shape": args.shape, "workload": {"shape": args.shape, "config": SHAPES[args.shape], "weights": f"random (seed {args.seed})",
                           "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "greedy": True, "eos": None},
              "config": {k: v for k, v in vars(args).items()}, "device": str(device),
              "copy_bandwidth_bytes_per_s": bandwidth, "copy_bandwidth_GBps": bandwidth / 1e9,
              "bytes_note": BYTES_NOTE, "rows": [],
              "int4_over_bf16_compiled": None, "int8_over_bf16_compiled": None, "over_bf16_compiled": {}}

    def emit(row: dict) -> None:
        row = {**dict.fromkeys(ROW_KEYS), **row}
        result["rows"].append(row)
        _ratios(result)
        report.write_json(result, out)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("traceback", "tokens", "warnings", "seconds_all")}
        print(f"[{time.perf_counter() - start:6.1f}s] {shown}", flush=True)

    def late() -> bool:
        return time.perf_counter() - start > args.deadline

    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed + 1))
    ids = ids.to(device)
    reference: dict[str, list[int]] = {}   # path -> bf16 tokens
    for variant in args.variants:
        if late():
            for path in args.paths:
                emit({"variant": variant, "path": path, "error": "skipped: deadline"})
            continue
        model, base, failed = None, {"variant": variant}, None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            model = build_model(args.shape, device, seed=args.seed)
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
            sync(device)
            base["build_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            bits, backend = variant_spec(variant, args.backend)
            if bits is not None:
                from specdec.quant import quantize

                quantize(model, bits=bits, group_size=args.group_size, backend=backend)
            sync(device)
            free_memory()
            base["quantize_seconds"] = time.perf_counter() - t0
            base["backend"] = backend_used(model)
            base["backends"] = base["backend"].split("+")
            if bits == 4:
                base["group_size"] = args.group_size
            base["bytes_per_token"] = decode_bytes(model)
            base["roofline_tok_s"] = bandwidth / base["bytes_per_token"]
        except Exception as err:  # noqa: BLE001 - record, go on with the next variant
            failed = (f"{type(err).__name__}: {err}", traceback.format_exc(limit=6))
        for path in args.paths:
            row = {**base, "path": path}
            if failed:
                emit({**row, "error": failed[0], "traceback": failed[1]})
                continue
            if late():
                emit({**row, "error": "skipped: deadline"})
                continue
            try:
                row.update(run_path(model, ids, path, args, device))
                row["roofline_fraction"] = row["tok_s"] / row["roofline_tok_s"]
                if row.get("decode_tok_s"):
                    row["decode_roofline_fraction"] = row["decode_tok_s"] / row["roofline_tok_s"]
                if variant == "bf16":
                    reference[path] = row["tokens"]
                row.update(agreement(row["tokens"], reference.get(path)))
                if path != "graphs" and "graphs" in reference:
                    row["agreement_with_bf16_graphs"] = agreement(row["tokens"], reference["graphs"])["agreement_with_bf16"]
                row["error"] = None
            except Exception as err:  # noqa: BLE001 - one failing row must not lose the rest
                row.update(error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc(limit=6))
            if device.type == "cuda":
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)  # since this variant's build
            emit(row)
        if model is not None:
            from specdec import static

            static.release(model)
        del model
        free_memory()
    result["total_seconds"] = time.perf_counter() - start
    report.write_json(result, out)
    print(f"wrote {out}", flush=True)
    return result


def _ratios(result: dict) -> None:
    """Quantized over bf16 tok/s on the graphs path, per variant (None while a side is missing or failed);
    ``int4_over_bf16_compiled`` / ``int8_over_bf16_compiled`` for the ``int4`` / ``int8`` variants."""
    tok = {r["variant"]: r.get("tok_s") for r in result["rows"] if r.get("path") == "graphs" and not r.get("error")}
    result["over_bf16_compiled"] = {v: t / tok["bf16"] for v, t in tok.items()
                                    if v != "bf16" and t and tok.get("bf16")}
    for variant in ("int4", "int8"):
        result[f"{variant}_over_bf16_compiled"] = result["over_bf16_compiled"].get(variant)


if __name__ == "__main__":
    main()
