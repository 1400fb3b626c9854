"""Held-out acceptance of draft files for the bundled default model, side by side in one run.

Greedy, k=4, specdec.generate on every ``code`` and ``chat`` benchmark prompt (the prompts
`specdec distill` holds out): acceptance = drafted tokens the target kept / drafted tokens.
Acceptance does not depend on timing, so a CPU run compares two draft files fairly (float32
here; a bf16 GPU run rounds differently and may differ by a few tokens).

    python -m benchmarks.draft_acceptance --drafts specdec/drafts/smollm2-135m-instruct-L6.safetensors new.safetensors \
        --out benchmarks/results/cpu/draft-acceptance.json

Feature drafts (``specdec distill --kind feature`` files) are measured the same way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafts", nargs="+", required=True,
                   help="draft files as shipped (.safetensors; layered or feature, the file's metadata says which)")
    p.add_argument("--names", nargs="*", default=None, help="a label per draft file (default: the file paths)")
    p.add_argument("--self-layers", type=int, default=4, help="also the untrained self-draft with this many layers "
                   "(0: skip it)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.drafts):
        p.error(f"--names needs one label per draft ({len(args.drafts)}), got {len(args.names)}")

    import specdec
    from specdec.integrations.models import load_model
    from specdec.distill import data, evaluate, shipped

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    target, tok = load_model(None, dtype=dtype, device=args.device)
    held = {w: data.encode_prompts(prompts, tok) for w, prompts in data.held_out_prompts().items()}
    drafts = {name: shipped.load_file(target, path) for name, path in zip(args.names or args.drafts, args.drafts)}
    if args.self_layers:
        drafts[f"self:{args.self_layers}"] = specdec.early_exit_model(target, args.self_layers)
    rows = {}
    for name, draft in drafts.items():
        start = time.perf_counter()
        rows[name] = evaluate.acceptance_by_workload(target, draft, held, k=4, max_new_tokens=args.max_new_tokens)
        print(f"{name:40s} " + "  ".join(f"{w} {r['acceptance_rate']:.3f}" for w, r in rows[name].items()
                                          if w != "mean") + f"  mean {rows[name]['mean']:.3f}"
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    result = {"environment": report.environment(), "command": "python -m benchmarks.draft_acceptance "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "settings": {"k": 4, "greedy": True, "max_new_tokens": args.max_new_tokens, "dtype": dtype,
                           "device": args.device, "prompts": {w: len(ids) for w, ids in held.items()},
                           "files": dict(zip(args.names or args.drafts, args.drafts))},
              "drafts": rows}
    report.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
