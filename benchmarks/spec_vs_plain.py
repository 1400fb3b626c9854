"""Speculation against our own plain decoding on the same path, per batch size and sampling mode.

``spec_over_plain`` = a speculative row's new tokens/s over our plain row's, both with
``compile=True`` (static cache + CUDA graphs) or both eager, measured in one process with the
variants taking turns per repeat. Prompts: everyday chat requests (unlike the distilled draft's
training text) and the bench's code workload. Greedy rows report agreement with our plain row.

    python -m benchmarks.spec_vs_plain --device cuda --batch-sizes 1 4 --sample 0 0.7 --out DIR
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

import specdec

from . import report, workloads
from .pipeline_bench import CHATS
from .run import agreement


def prompt_sets(tok, n: int) -> dict[str, list[list[int]]]:
    """Token ids per workload: ``general`` (chat-templated everyday requests) and ``code``."""
    general = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
               for c in CHATS[:n]]
    general = [g["input_ids"] if isinstance(g, dict) or hasattr(g, "keys") else g for g in general]
    code = [workloads.encode(p, tok, 1024) for p in workloads.get_workload("code", n).prompts]
    return {"general": general, "code": code}


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def variants(compile_mode) -> dict[str, dict]:
    return {"plain": dict(compile=compile_mode), "lookup": dict(compile=compile_mode, prompt_lookup_num_tokens=10),
            "distilled": dict(compile=compile_mode, draft_model="distilled")}


def run_batches(model, batches, kw: dict, max_new: int, temperature: float, seed: int):
    """(new tokens per row, seconds, stats list) for every batch of prompts."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=0.9) if temperature else dict(do_sample=False)
    tokens, stats, seconds = [], [], 0.0
    for ids, mask in batches:
        gc.collect()   # a full collection of the last call's garbage must not land inside this one's clock
        _sync(model)
        start = time.perf_counter()
        out, st = specdec.generate(model, ids, mask, max_new_tokens=max_new, return_stats=True,
                                   generator=torch.Generator(ids.device).manual_seed(seed) if temperature else None,
                                   **sampling, **kw)
        _sync(model)
        seconds += time.perf_counter() - start
        tokens += [row[ids.shape[1]:].tolist() for row in out]
        stats.append(st)
    return tokens, seconds, stats


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def measure(model, tok, prompts, batch_size: int, temperature: float, args) -> list[dict]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [left_pad(prompts[i:i + batch_size], pad, model.device) for i in range(0, len(prompts), batch_size)]
    named = variants(True if args.device.startswith("cuda") else False)
    for kw in named.values():  # an untimed pass over every batch: whatever a batch needs (a graph for
        # rows that finished early, a static cache of its length) is built before the clock runs, and
        # the controller starts from what it learned, as in a server's later calls
        run_batches(model, batches, kw, args.max_new_tokens, temperature, 0)
    times, results = {n: [] for n in named}, {}
    for repeat in range(args.repeats):
        for name, kw in named.items():
            results[name] = run_batches(model, batches, kw, args.max_new_tokens, temperature, repeat)
            times[name].append(results[name][1])
    rows = []
    for name in named:
        tokens, _, stats = results[name]
        new = sum(len(t) for t in tokens)
        pairs = [agreement(r, t) for r, t in zip(results["plain"][0], tokens)]
        proposed = sum(sum(s.proposed) for s in stats)
        rows.append(dict(variant=name, batch_size=batch_size, temperature=temperature, new_tokens=new,
                         seconds=statistics.median(times[name]), tok_s=new / statistics.median(times[name]),
                         repeat_seconds=[round(t, 4) for t in times[name]],
                         acceptance_rate=sum(sum(s.accepted) for s in stats) / proposed if proposed else None,
                         tokens_per_step=new / max(sum(s.target_forwards * len(s.new_tokens) for s in stats), 1),
                         spec_steps=sum(sum(1 for k in s.k_history if k) for s in stats),
                         agreement_with_plain=None if temperature else sum(a for a, _ in pairs) / len(pairs)))
    for r in rows:
        r["spec_over_plain"] = r["tok_s"] / rows[0]["tok_s"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--workloads", nargs="+", default=["general", "code"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--sample", type=float, nargs="+", default=[0.0, 0.7], help="temperatures; 0 = greedy")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    from specdec.integrations.models import load_model

    model, tok = load_model(None, dtype=args.dtype, device=args.device)
    sets, rows = prompt_sets(tok, args.n_prompts), []
    result = dict(environment=report.environment(), command="python -m benchmarks.spec_vs_plain " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]), model="SmolLM2-135M-Instruct (bundled)",
        dtype=args.dtype, path="compile=True (graphs)" if args.device.startswith("cuda") else "eager", rows=rows)
    path = Path(args.out) / f"spec-vs-plain-smollm2-{report.device_slug(result['environment'])}-{args.dtype}.json"
    for workload in args.workloads:
        for batch_size in args.batch_sizes:
            for temperature in args.sample:
                for r in measure(model, tok, sets[workload], batch_size, temperature, args):
                    rows.append(dict(workload=workload, **r))
                    print(f"{workload:8} b{batch_size} T={temperature} {r['variant']:10} {r['tok_s']:8.1f} tok/s "
                          f"x{r['spec_over_plain']:.2f} acc={r['acceptance_rate']} tps={r['tokens_per_step']:.2f} "
                          f"agree={r['agreement_with_plain']}", flush=True)
                report.write_json(result, path)   # after each setting: a run cut short keeps what it measured
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
