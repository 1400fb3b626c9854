"""A ``pipeline("text-generation")`` patched with specdec vs the same pipeline unpatched.

What a pipeline user gets from two lines (``patch(pipe, compile=True, draft_model=...)``):
chat messages in, text out, timed end to end (tokenizing, the chat template, generate,
decoding) at each batch size, variants interleaved per repeat. Greedy rows report their
agreement with the unpatched pipeline's tokens (identical in fp32; in bf16 near-ties may flip).

    python -m benchmarks.pipeline_bench --device cuda --dtype bfloat16 --batch-sizes 1 4 --out DIR
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import report
from .run import agreement

# everyday requests, unlike the distilled draft's training text
CHATS = ["Give me three tips for sleeping better.", "Translate 'Where is the train station?' into French and German.",
         "Explain in two sentences why the sky is blue.", "Write a four-line poem about autumn leaves.",
         "What is 17 multiplied by 23? Show the steps.", "Write a short, polite email declining a meeting.",
         "List five vegetables that grow well in shade.", "Summarize the story of Cinderella in three sentences."]


def variants(draft: str) -> dict[str, dict | None]:
    """Name -> patch() keywords (None: the pipeline unpatched)."""
    return {"pipeline": None, "patched-plain+graphs": dict(compile=True),
            "patched-lookup+graphs": dict(compile=True, prompt_lookup_num_tokens=10),
            f"patched-{draft}+graphs": dict(compile=True, draft_model=draft)}


def run_once(pipe, patch_kw, chats, batch_size: int, max_new: int) -> tuple[list[list[int]], float]:
    """Token ids of each answer's text and the wall time of the whole pipeline call."""
    from specdec.integrations import patch, unpatch

    if patch_kw is not None:
        patch(pipe, **patch_kw)
    try:
        _sync(pipe)
        start = time.perf_counter()
        out = pipe([[{"role": "user", "content": c}] for c in chats], batch_size=batch_size, max_new_tokens=max_new,
                   do_sample=False, return_full_text=False)
        _sync(pipe)
        seconds = time.perf_counter() - start
    finally:
        unpatch(pipe)
    # the answers' text, tokenized again: what the user got, counted in tokens
    return [pipe.tokenizer(o[0]["generated_text"], add_special_tokens=False).input_ids for o in out], seconds


def _sync(pipe) -> None:
    if pipe.model.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=len(CHATS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--draft", default="distilled", help="draft for the draft row (default: distilled)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    import transformers

    from specdec.integrations.models import load_model

    model, tok = load_model(None, dtype=args.dtype, device=args.device)
    if tok.pad_token is None:  # batched pipelines need one (some transformers versions' GGUF loader sets none)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # what HF asks of batched decoder-only generation
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok, device=model.device)
    chats = CHATS[: args.n_prompts]
    rows = []
    for batch_size in args.batch_sizes:
        rows += _measure(pipe, variants(args.draft), chats, batch_size, args)
    result = dict(environment=report.environment(), command="python -m benchmarks.pipeline_bench " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]), model="SmolLM2-135M-Instruct (bundled)",
        dtype=args.dtype, workload=dict(prompts=chats, max_new_tokens=args.max_new_tokens), rows=rows)
    path = Path(args.out) / f"pipeline-smollm2-{report.device_slug(result['environment'])}-{args.dtype}.json"
    report.write_json(result, path)
    for r in rows:
        print(f"batch {r['batch_size']} {r['variant']:<32} {r['tok_s']:8.1f} tok/s  {r['speedup_vs_pipeline']:.2f}x"
              f"  agreement {r['agreement']:.3f}")
    print(f"wrote {path}")
    return result


def _measure(pipe, named: dict, chats, batch_size: int, args) -> list[dict]:
    for kw in named.values():  # warm-up at the timed length: graphs are captured per static-cache size
        run_once(pipe, kw, chats[:batch_size], batch_size, args.max_new_tokens)
    times = {name: [] for name in named}
    tokens = {}
    for _ in range(args.repeats):                     # variants take turns: drift hits all alike
        for name, kw in named.items():
            tokens[name], seconds = run_once(pipe, kw, chats, batch_size, args.max_new_tokens)
            times[name].append(seconds)
    ref = tokens["pipeline"]
    rows = []
    for name in named:
        new = sum(len(t) for t in tokens[name])
        pairs = [agreement(r, t) for r, t in zip(ref, tokens[name])]
        rows.append(dict(variant=name, batch_size=batch_size, n_prompts=len(chats), new_tokens=new,
                         seconds=statistics.median(times[name]), tok_s=new / statistics.median(times[name]),
                         agreement=sum(a for a, _ in pairs) / len(pairs),
                         identical=all(a == 1.0 for a, _ in pairs)))
    base = rows[0]["tok_s"]
    for r in rows:
        r["speedup_vs_pipeline"] = r["tok_s"] / base
    return rows


if __name__ == "__main__":
    main()
