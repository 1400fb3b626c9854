"""Decode speed of draft files for the bundled default model, side by side in one process.

Greedy, batch 1, ``num_draft_tokens="auto"``, ``specdec.generate`` on the first N ``code`` and
``chat`` benchmark prompts; the drafts and plain decoding (no draft) take turns, repeated, so
that a noisy machine slows them alike. Every drafted output must equal plain greedy decoding
token for token in float32 (a row that does not is marked, not dropped). Compare drafts by
their tokens/s in one run, not across runs.

    python -m benchmarks.draft_speed --drafts specdec/drafts/smollm2-135m-instruct-L6.safetensors new.safetensors \\
        --names shipped new --out benchmarks/results/cpu/draft-speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafts", nargs="+", required=True, help="draft files as shipped (.safetensors, either kind)")
    p.add_argument("--names", nargs="*", default=None, help="a label per draft file (default: the file paths)")
    p.add_argument("--n-prompts", type=int, default=2, help="prompts per workload (code, chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="rounds of every variant on every prompt")
    p.add_argument("--compile", action="store_true", help="compile=True (static cache + CUDA graphs; GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.drafts):
        p.error(f"--names needs one label per draft ({len(args.drafts)}), got {len(args.names)}")
    if args.n_prompts < 1 or args.repeats < 1:
        p.error("--n-prompts and --repeats must be >= 1")

    from specdec.integrations.models import load_model
    from specdec.distill import data, shipped

    labels = args.names or args.drafts
    target, tok = load_model(None, dtype=args.dtype, device=args.device)
    prompts = [(w, ids) for w, ps in data.held_out_prompts().items()
               for ids in data.encode_prompts(ps[:args.n_prompts], tok)]
    variants = {"plain": None} | {name: shipped.load_file(target, path)
                                  for name, path in zip(labels, args.drafts)}
    runs = {name: {w: [] for w, _ in prompts} for name in variants}
    plain_out: dict[int, list[int]] = {}
    identical = {name: True for name in variants}
    for rep in range(args.repeats + 1):  # the first pass warms up (and, compiled, captures graphs); not timed
        for i, (workload, ids) in enumerate(prompts):
            for name, draft in variants.items():
                out, seconds, stats = _generate(target, ids, draft, args)
                if name == "plain":
                    plain_out.setdefault(i, out)
                identical[name] &= out == plain_out.get(i, out)
                if rep:
                    runs[name][workload].append(dict(seconds=seconds, new_tokens=len(out), **stats))
    rows = {name: _summary(by_workload) | {"identical_to_plain": identical[name]} for name, by_workload in runs.items()}
    for name, row in rows.items():
        print(f"{name:12s} " + "  ".join(f"{w} {r['tokens_per_s']:.1f} tok/s ({r['tokens_per_step']:.2f}/step)"
                                          for w, r in row["workloads"].items())
              + f"  identical to plain: {row['identical_to_plain']}", flush=True)
    result = {"environment": report.environment(), "command": "python -m benchmarks.draft_speed "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "settings": {"greedy": True, "batch_size": 1, "num_draft_tokens": "auto", "compile": args.compile,
                           "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "dtype": args.dtype,
                           "device": args.device, "prompts_per_workload": args.n_prompts,
                           "files": dict(zip(labels, args.drafts))},
              "variants": rows}
    report.write_json(result, args.out)
    return result


def _generate(target, ids: list[int], draft, args) -> tuple[list[int], float, dict]:
    import specdec

    device = target.get_input_embeddings().weight.device
    x = torch.tensor([ids], device=device)
    kw = dict(draft_model=draft, num_draft_tokens="auto") if draft is not None else {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out, stats = specdec.generate(target, x, do_sample=False, max_new_tokens=args.max_new_tokens,
                                  return_stats=True, compile=args.compile, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = sum(stats.steps)
    return out[0, len(ids):].tolist(), seconds, dict(steps=steps, accepted=sum(stats.accepted),
                                                     proposed=sum(stats.proposed))


def _summary(by_workload: dict[str, list[dict]]) -> dict:
    """Per workload: tokens/s over all timed runs (total tokens / total seconds), the median
    run's, tokens per target forward and acceptance."""
    out = {}
    for w, runs in by_workload.items():
        tokens, seconds = sum(r["new_tokens"] for r in runs), sum(r["seconds"] for r in runs)
        proposed = sum(r["proposed"] for r in runs)
        out[w] = dict(tokens_per_s=tokens / seconds,
                      median_run_tokens_per_s=statistics.median(r["new_tokens"] / r["seconds"] for r in runs),
                      # the first new token comes from the prefill, not a decode step
                      tokens_per_step=sum(r["new_tokens"] - 1 for r in runs) / max(sum(r["steps"] for r in runs), 1),
                      acceptance=sum(r["accepted"] for r in runs) / proposed if proposed else None,
                      runs=len(runs))
    return {"workloads": out}


if __name__ == "__main__":
    main()
