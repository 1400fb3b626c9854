"""Perplexity of the bundled default model under weight and KV-cache quantization.

Text: Python's own documentation shipped in the stdlib (``pydoc_data.topics``), so it runs
offline. Windows of ``--window`` tokens with ``--stride`` (the usual sliding-window
perplexity); the KV variants feed each window in ``--chunk``-token pieces through the cache so
that attention reads quantized past keys/values (a one-shot forward never would).
``method="gptq"`` rows calibrate on other reference pages: every topic that shares text with the
scored topics is left out (``calibration_ids``).

    python -m benchmarks.quant_quality --out benchmarks/results/quant-quality-cpu.json
    python -m benchmarks.quant_quality --only int4-g64-search int4-g64-gptq --merge  # keep other rows
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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
         "KV variants feed each window in --chunk-token pieces so attention reads the quantized past. "
         "kv-*: the eager QuantizedKVCache (KIVI: per-channel keys, --residual recent tokens in full "
         "precision); static-kv-*: compile=True's static cache (per-token codes, groups of 32 channels, "
         "no full-precision residual), the same runner as on GPU without graphs.")
TARGETS = {"int8": 1.0, "int4-g64": 8.0, "kv-int8": 0.5, "kv-int4": 3.0}  # max ppl increase, %
METHOD_NOTES = ("int4 methods: rtn = min/max round-to-nearest; search = per-group clipped range of lowest "
                "squared weight error (quant.search, data-free); gptq = GPTQ with least-squares refits of each "
                "group's scale/zero and coordinate-descent sweeps over the codes (quant.gptq), calibrated on "
                "reference pages that share no text with the scored ones. quantize_seconds: quantization "
                "alone; seconds: quantization + perplexity.")


def load_text(topics: tuple[str, ...] = TOPICS) -> str:
    from pydoc_data.topics import topics as docs

    return "\n\n".join(docs[t] for t in topics)


def calibration_ids(tokenizer, n_seqs: int, seq_len: int, scored: tuple[str, ...] = TOPICS,
                    probe: int = 80) -> tuple[torch.Tensor, list[str]]:
    """(n_seqs, seq_len) token ids spread evenly over the reference pages that share no text with
    the ``scored`` ones (no ``probe``-char window of a page, stepped by probe/2, occurs in them);
    and the names of the pages left out."""
    from pydoc_data.topics import topics as docs

    scored_text = load_text(scored)

    def overlaps(page: str) -> bool:
        return any(page[i:i + probe] in scored_text for i in range(0, max(1, len(page) - probe), probe // 2))

    left_out = [k for k in sorted(docs) if k in scored or overlaps(docs[k])]
    text = "\n\n".join(docs[k] for k in sorted(docs) if k not in left_out)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_seqs * seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than {n_seqs} x {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, n_seqs).long().tolist()
    return torch.stack([ids[b:b + seq_len] for b in starts]), left_out


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


class StaticFeed:
    """A window fed through ``compile=True``'s static cache, holding int codes (``kv_quant=``) for
    ``bits`` 8/4, in ``chunk``-token forwards (on CPU the same runner, without CUDA graphs)."""

    def __init__(self, model, bits: int | None, max_len: int):
        from specdec.static import StaticRunner

        self.runner = StaticRunner(model, 1, max_len, use_graphs=False, kv_bits=bits, join=False)

    def logits(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        self.runner.graph_max_tokens = chunk
        cache, parts = self.runner.new_cache(), []
        for i in range(0, ids.shape[1], chunk):
            piece = ids[:, i:i + chunk]
            n = piece.shape[1]
            key_mask = torch.ones(1, i + n, dtype=torch.long, device=ids.device)
            positions = torch.arange(i, i + n, device=ids.device)[None]
            parts.append(self.runner.forward(piece, key_mask, positions, cache))
        return torch.cat(parts, dim=1)


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, first: int, cache=None, chunk: int = 0) -> tuple[float, int]:
    """Summed NLL of ids[first+1:] given what precedes, for one (1, T) window."""
    if cache is None:
        logits = model(ids).logits
    elif isinstance(cache, StaticFeed):
        logits = cache.logits(ids, chunk)
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


def variants(args, calibration: torch.Tensor | None = None):
    """name -> (model factory, cache factory or None)."""
    from specdec.quant import QuantizedKVCache, quantize

    def weights(bits, g=64, method="rtn"):
        cal = calibration if method == "gptq" else None
        return lambda base: quantize(copy.deepcopy(base), bits=bits, group_size=g, backend=args.backend,
                                     method=method, calibration=cal)

    def kv(bits):
        return lambda model: (lambda: QuantizedKVCache(model.config, bits=bits, residual_length=args.residual))

    def static_kv(bits):
        return lambda model: (lambda: StaticFeed(model, bits, args.window))

    same = lambda base: base  # noqa: E731
    return {
        "fp32": (same, None),
        "int8": (weights(8), None),
        "int4-g32": (weights(4, 32), None),
        "int4-g64": (weights(4, 64), None),
        "int4-g128": (weights(4, 128), None),
        "int4-g32-search": (weights(4, 32, "search"), None),
        "int4-g64-search": (weights(4, 64, "search"), None),
        "int4-g32-gptq": (weights(4, 32, "gptq"), None),
        "int4-g64-gptq": (weights(4, 64, "gptq"), None),
        "kv-int8": (same, kv(8)),
        "kv-int4": (same, kv(4)),
        "static-fp32": (same, static_kv(None)),
        "static-kv-int8": (same, static_kv(8)),
        "static-kv-int4": (same, static_kv(4)),
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
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing --out file that this run does not redo")
    p.add_argument("--calib-seqs", type=int, default=16, help="gptq calibration sequences")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per gptq calibration sequence")
    args = p.parse_args(argv)

    from specdec.integrations.models import load_default

    torch.manual_seed(0)
    load_start = os.getloadavg()[0]  # other jobs on the host slow the timings, not the perplexities
    base, tok = load_default(device=args.device)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, :args.tokens].to(args.device)
    torch.set_num_threads(args.threads)
    calibration, left_out = calibration_ids(tok, args.calib_seqs, args.calib_len)
    todo = variants(args, calibration.to(args.device))
    names = [n for n in todo if n == "fp32" or not args.only or n in args.only]
    results = {}
    for name in names:
        make_model, make_cache = todo[name]
        t0 = time.perf_counter()
        try:
            model = make_model(base)
            quantize_seconds = time.perf_counter() - t0
            cache = make_cache(model) if make_cache else None
            ppl = perplexity(model, ids, args.window, args.stride, cache, args.chunk)
            results[name] = {"ppl": round(ppl, 4), "seconds": round(time.perf_counter() - t0, 1)}
            if model is not base:
                results[name]["quantize_seconds"] = round(quantize_seconds, 1)
            backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
            if backends:
                results[name]["backends"] = backends
        except Exception as err:  # one failing variant must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, results[name], flush=True)
    _add_deltas(results)
    merged = _merge_earlier(results, Path(args.out)) if args.merge else []
    report = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                            f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized to fp32)",
        "text": f"pydoc_data.topics {list(TOPICS)} (Python {platform.python_version()} stdlib docs)",
        "host_load_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2),
                           "cpus": os.cpu_count()},
        "tokens": int(ids.shape[1]), "window": args.window, "stride": args.stride, "kv_chunk": args.chunk,
        "kv_residual_length": args.residual, "targets_max_delta_pct": TARGETS,
        "calibration": {"text": "pydoc_data.topics, less the scored topics and every topic sharing text "
                                "with them", "left_out": left_out, "sequences": args.calib_seqs,
                        "tokens_per_sequence": args.calib_len},
        "notes": NOTES, "method_notes": METHOD_NOTES, "results": results,
        "best_int4_g64": _best(results, "int4-g64"),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    if merged:
        report["rows_from_earlier_run"] = merged
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _target(name: str) -> float | None:
    """The target of a row: its own, or its format's (``int4-g64-gptq`` -> ``int4-g64``)."""
    return TARGETS.get(name, TARGETS.get(name.rsplit("-", 1)[0]) if name.startswith("int4-") else None)


def _add_deltas(results: dict) -> None:
    """Delta % vs fp32, and whether the target is met."""
    for name, r in results.items():
        base = results.get("fp32", {}).get("ppl")
        if "ppl" in r and base and name != "fp32":
            r["delta_pct"] = round(100 * (r["ppl"] / base - 1), 3)
            if _target(name) is not None:
                r["target_met"] = r["delta_pct"] <= _target(name)


def _best(results: dict, prefix: str) -> dict | None:
    """The row named ``prefix`` or ``prefix-<method>`` with the lowest perplexity."""
    rows = {n: r for n, r in results.items() if (n == prefix or n.startswith(prefix + "-")) and "ppl" in r}
    if not rows:
        return None
    name = min(rows, key=lambda n: rows[n]["ppl"])
    return {"variant": name, **{k: rows[name][k] for k in ("ppl", "delta_pct", "target_met") if k in rows[name]}}


def _merge_earlier(results: dict, path: Path) -> list[str]:
    """Add the rows of an earlier report at ``path`` that ``results`` lacks; their names."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text()).get("results", {})
    kept = [n for n in earlier if n not in results]
    results.update({n: earlier[n] for n in kept})
    return kept


if __name__ == "__main__":
    main()
