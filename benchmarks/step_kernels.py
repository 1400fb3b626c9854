"""Where a compiled decode step's GPU time goes: one profiled generate() of a random-weight Llama.

    python -m benchmarks.step_kernels --shape llama-8b --out DIR

Runs ``specdec.generate(compile="inductor")`` once to compile and capture, then profiles a second
call (CUDA graph replays included: the profiler records each kernel a graph launches) and writes
``step-kernels-<shape>.json``: wall and GPU-busy ms per decoded token, and the kernels by total time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import specdec

from .roofline import build
from .report import environment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-8b")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    model = build(args.shape)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, compile="inductor")
    specdec.generate(model, ids, **kw)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        specdec.generate(model, ids, **kw)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = kernels.setdefault(e.name, [0, 0.0])
            row[0] += 1
            row[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    busy_us = sum(t for _, t in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:40]
    result = {"environment": environment(), "shape": args.shape, "new_tokens": args.new_tokens,
              "command": "python -m benchmarks.step_kernels " + " ".join(argv or []),
              "wall_ms_per_token": 1e3 * wall / args.new_tokens, "gpu_busy_ms_per_token": busy_us / 1e3 / args.new_tokens,
              "kernel_launches_per_token": sum(c for c, _ in kernels.values()) / args.new_tokens,
              "kernels": [{"name": n[:160], "calls": c, "us_per_token": t / args.new_tokens} for n, (c, t) in top]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"step-kernels-{args.shape}.json").write_text(json.dumps(result, indent=1))
    print({k: v for k, v in result.items() if k not in ("kernels", "environment")})
    for k in result["kernels"][:25]:
        print(f"{k['us_per_token']:9.1f} us  x{k['calls'] / args.new_tokens:5.1f}  {k['name'][:110]}")
    return result


if __name__ == "__main__":
    main()
