"""Perplexity of the bundled default model under weight and KV-cache quantization.

Text: Python's own documentation shipped in the stdlib (``pydoc_data.topics``), so it runs
offline. Windows of ``--window`` tokens with ``--stride`` (the usual sliding-window
perplexity); the KV variants feed each window in ``--chunk``-token pieces through the cache so
that attention reads quantized past keys/values (a one-shot forward never would).

    python -m benchmarks.quant_quality --out benchmarks/results/quant-quality-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

TOPICS = ("execmodel", "compound")
NOTES = ("The bundled model ships as GGUF Q4_1: its weights are already 4-bit, asymmetric, in groups of 32, "
         "so int4-g32 reproduces them exactly and the other weight formats re-quantize a 4-bit grid. "
         "Its hidden size 576 is not a multiple of 128, so int4-g128 cannot apply to it. "
         "KV variants feed each window in --chunk-token pieces so attention reads the quantized past.")
TARGETS = {"int8": 1.0, "int4-g64": 8.0, "kv-int8": 0.5, "kv-int4": 3.0}  # max ppl increase, %


def load_text(topics: tuple[str, ...] = TOPICS) -> str:
    from pydoc_data.topics import topics as docs

    return "\n\n".join(docs[t] for t in topics)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first logit index to score) so every token after the first is scored once.

    Logit j of a window predicts token begin + j + 1; windows overlap by at least one token.
    """
    out, begin, prev_end = [], 0, 1
    while True:
        end = min(begin + window, n_tokens)
        out.append((begin, end, prev_end - begin - 1))
        if end >= n_tokens:
            return out
        begin, prev_end = begin + max(1, min(stride, window - 1)), end


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, first: int, cache=None, chunk: int = 0) -> tuple[float, int]:
    """Summed NLL of ids[first+1:] given what precedes, for one (1, T) window."""
    if cache is None:
        logits = model(ids).logits
    else:
        parts = [model(ids[:, i:i + chunk], past_key_values=cache, use_cache=True).logits
                 for i in range(0, ids.shape[1], chunk)]
        logits = torch.cat(parts, dim=1)
    start = max(first, 0)
    logp = torch.log_softmax(logits[0, start:-1].float(), dim=-1)
    target = ids[0, start + 1:]
    return -logp.gather(1, target[:, None]).sum().item(), target.numel()


def perplexity(model, ids: torch.Tensor, window: int, stride: int, make_cache=None, chunk: int = 0) -> float:
    nll, count = 0.0, 0
    for begin, end, first in windows(ids.shape[1], window, stride):
        cache = make_cache() if make_cache else None
        s, n = window_nll(model, ids[:, begin:end], first, cache, chunk)
        nll, count = nll + s, count + n
    return math.exp(nll / count)


def variants(args):
    """name -> (model factory, cache factory or None)."""
    from quant import QuantizedKVCache, quantize

    def weights(bits, g=64):
        return lambda base: quantize(copy.deepcopy(base), bits=bits, group_size=g, backend=args.backend)

    def kv(bits):
        return lambda cfg: (lambda: QuantizedKVCache(cfg, bits=bits, residual_length=args.residual))

    same = lambda base: base  # noqa: E731
    return {
        "fp32": (same, None),
        "int8": (weights(8), None),
        "int4-g32": (weights(4, 32), None),
        "int4-g64": (weights(4, 64), None),
        "int4-g128": (weights(4, 128), None),
        "kv-int8": (same, kv(8)),
        "kv-int4": (same, kv(4)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/quant-quality-cpu.json", help="JSON file to write")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of text to score (>= 2048 recommended)")
    p.add_argument("--window", type=int, default=1024, help="context window per forward")
    p.add_argument("--stride", type=int, default=960, help="window stride (windows overlap by window - stride)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward for the KV-cache variants")
    p.add_argument("--residual", type=int, default=64, help="QuantizedKVCache residual_length")
    p.add_argument("--backend", default="reference",
                   help="quantize() backend (reference: same numbers as the kernels, faster for CPU prefill)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--only", nargs="*", help="subset of variants (fp32 always runs)")
    args = p.parse_args(argv)

    from integrations.models import load_default

    torch.manual_seed(0)
    base, tok = load_default(device=args.device)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :args.tokens].to(args.device)
    torch.set_num_threads(args.threads)
    todo = variants(args)
    names = [n for n in todo if n == "fp32" or not args.only or n in args.only]
    results = {}
    for name in names:
        make_model, make_cache = todo[name]
        t0 = time.perf_counter()
        try:
            model = make_model(base)
            cache = make_cache(model.config) if make_cache else None
            ppl = perplexity(model, ids, args.window, args.stride, cache, args.chunk)
            results[name] = {"ppl": round(ppl, 4), "seconds": round(time.perf_counter() - t0, 1)}
            backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
            if backends:
                results[name]["backends"] = backends
        except Exception as err:  # one failing variant must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, results[name], flush=True)
    _add_deltas(results)
    report = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                            f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized to fp32)",
        "text": f"pydoc_data.topics {list(TOPICS)} (Python {platform.python_version()} stdlib docs)",
        "tokens": int(ids.shape[1]), "window": args.window, "stride": args.stride, "kv_chunk": args.chunk,
        "kv_residual_length": args.residual, "targets_max_delta_pct": TARGETS,
        "notes": NOTES, "results": results, "command": " ".join([sys.executable, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _add_deltas(results: dict) -> None:
    """Delta % vs fp32, and whether the target is met."""
    for name, r in results.items():
        base = results.get("fp32", {}).get("ppl")
        if "ppl" in r and base and name != "fp32":
            r["delta_pct"] = round(100 * (r["ppl"] / base - 1), 3)
            if name in TARGETS:
                r["target_met"] = r["delta_pct"] <= TARGETS[name]


if __name__ == "__main__":
    main()
