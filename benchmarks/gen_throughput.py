"""Batched greedy generation throughput of the SmolLM2-135M shape (random weights): what
`specdec distill` pays to let the target write its training text. specdec.generate (eager and
compile=True) vs HF generate() at a few batch sizes: new tokens per second, ms per decode step,
and each variant's token agreement with the first (bf16: near-ties may flip).

    python -m benchmarks.gen_throughput --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import specdec

from . import report
from .roofline import build, timed


def measure(model, batch: int, prompt: int, new: int, device: str, variants: list[str]) -> dict:
    ids = torch.randint(100, 40_000, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, : prompt // 4] = 0  # half the rows left-padded, as length-grouped prompts are
    calls = {
        "specdec": lambda: specdec.generate(model, ids, mask, do_sample=False, max_new_tokens=new),
        "specdec-graphs": lambda: specdec.generate(model, ids, mask, do_sample=False, max_new_tokens=new, compile=True),
        "hf": lambda: model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=0),
    }
    row, reference = {}, None
    for name, call in ((n, calls[n]) for n in variants):
        call()  # warm-up (graph capture for specdec-graphs)
        seconds, out = timed(call)
        out = out[:, prompt:]
        reference = out if reference is None else reference
        row.setdefault("agreement", {})[name] = round(float((out == reference).float().mean()), 4)
        row[name] = {"s": round(seconds, 3), "new_tokens_per_s": round(batch * new / seconds),
                     "ms_per_step": round(seconds / new * 1000, 2)}
        print(f"batch {batch:5d} {name:8s} {row[name]['new_tokens_per_s']:8d} new tok/s  "
              f"{row[name]['ms_per_step']:7.2f} ms/step", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda",))
    p.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--variants", nargs="+", default=["specdec", "specdec-graphs", "hf"])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row (default 256)")
    p.add_argument("--new", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    model = build("smollm2-135m")  # on cuda, bf16
    rows = {b: measure(model, b, args.prompt, args.new, args.device, args.variants) for b in args.batches}
    result = {"environment": report.environment(), "command": "python -m benchmarks.gen_throughput",
              "settings": vars(args) | {"out": None, "dtype": str(dtype), "weights": "random (SmolLM2-135M shape)"},
              "batches": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gen-throughput.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
