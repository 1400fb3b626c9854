"""Batched throughput: HF batched generate() vs specdec at batch size B (default 8).

Prompts of different lengths, left-padded as HF users pass them. HF assisted
generation refuses batch > 1 (its row records the error). Reports total new tokens/s
and, for greedy rows, agreement with HF's batched output.

    python -m benchmarks.batch_bench --device cuda --batch-size 8 --out DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import specdec

from . import report, workloads
from .run import agreement


def _batch(tok, n: int, device):
    prompts = (workloads.get_workload("code").prompts + workloads.get_workload("chat", 4).prompts)[:n]
    ids = [workloads.encode(p, tok, 512) for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft", default="self:8")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    from specdec.integrations.models import load_default

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    device = torch.device(args.device)
    model, tok = load_default(dtype=dtype, device=device)
    ids, mask = _batch(tok, args.batch_size, device)
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)
    draft = specdec.early_exit_model(model, int(args.draft.split(":")[1]))
    variants = {
        "hf": lambda: model.generate(ids, attention_mask=mask, **kw),
        "hf-assisted": lambda: model.generate(ids, attention_mask=mask, assistant_model=draft, **kw),
        "hf-lookup": lambda: model.generate(ids, attention_mask=mask, prompt_lookup_num_tokens=10, **kw),
        "ours-plain": lambda: specdec.generate(model, ids, mask, **kw),
        "ours-lookup": lambda: specdec.generate(model, ids, mask, prompt_lookup_num_tokens=10, **kw),
        "ours-draft": lambda: specdec.generate(model, ids, mask, draft_model=draft, **kw),
    }
    rows, ref = [], None
    for name, fn in variants.items():
        row = dict(variant=name, batch_size=args.batch_size, dtype=dtype, max_new_tokens=args.max_new_tokens)
        try:
            fn()  # warm-up
            out, secs = _timed(fn, device)
            new = out[:, ids.shape[1]:]
            ref = new if name == "hf" else ref
            pairs = [agreement(r.tolist(), o.tolist()) for r, o in zip(ref, new)]
            row.update(e2e_tok_s=new.numel() / secs, seconds=secs,
                       agreement=sum(a for a, _ in pairs) / len(pairs), identical_to_hf=all(a == 1 for a, _ in pairs))
        except Exception as exc:  # HF assisted refuses batch > 1
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(row)
    base = next(r for r in rows if r["variant"] == "hf")
    for r in rows:
        if r.get("e2e_tok_s"):
            r["speedup_vs_hf"] = r["e2e_tok_s"] / base["e2e_tok_s"]
    result = dict(environment=report.environment(), model="SmolLM2-135M-Instruct", rows=rows,
                  prompt_tokens=mask.sum(-1).tolist(), command="python -m benchmarks.batch_bench " + " ".join(argv or []))
    report.write_json(result, Path(args.out) / f"batch{args.batch_size}-{report.device_slug(result['environment'])}.json")
    return result


if __name__ == "__main__":
    main()
