"""Speculative decoding with a target split over two GPUs by accelerate (``device_map``).

A random-weight Llama (default: 1B shape) is saved once, then loaded twice: whole on
cuda:0, and split over cuda:0 and cuda:1 with ``device_map="auto"`` and a per-GPU
memory cap that forces the split. Greedy outputs (fp32) of HF generate, ours unsplit
and ours split must be identical; drafts: prompt lookup and a small draft model kept
on cuda:0 (a draft on another device than most of the target). Reports tokens/s.

    python -m benchmarks.multi_gpu --out DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import specdec

from . import report


def _config(shape: str):
    from transformers import LlamaConfig

    shapes = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8),
              "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2)}
    return LlamaConfig(**shapes[shape], vocab_size=32000, max_position_embeddings=4096)


def _save_random(shape: str, folder: Path, seed: int) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(shape))
    with torch.no_grad():  # peaked logits, like a trained model: few argmax near-ties
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    path = folder / shape
    model.save_pretrained(path)
    return path


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    tmp = Path(tempfile.mkdtemp())
    target_path, draft_path = _save_random(args.shape, tmp, 0), _save_random("tiny", tmp, 1)
    whole = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).to("cuda:0").eval()
    per_gpu = sum(t.numel() * 4 for t in whole.parameters()) * 0.6
    split = AutoModelForCausalLM.from_pretrained(
        target_path, dtype=torch.float32, device_map="auto",
        max_memory={0: int(per_gpu), 1: int(per_gpu * 2), "cpu": 0}).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).to("cuda:0").eval()
    devices = sorted({str(p.device) for p in split.parameters()})
    prompt = torch.tensor([[1] + [7, 8, 9, 10, 11, 12] * 20], device="cuda:0")
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False)
    whole.generate(prompt[:, :16], max_new_tokens=4)  # warm-up
    ref, t_hf = _timed(lambda: whole.generate(prompt, **kw))
    rows = {}
    for name, model in (("unsplit", whole), ("split", split)):
        for drafter, extra in (("plain", {}), ("lookup", dict(prompt_lookup_num_tokens=8)),
                               ("draft-model-cuda0", dict(draft_model=draft)), ("self:4", dict(draft_model="self:4"))):
            specdec.generate(model, prompt[:, :16], max_new_tokens=4, **extra)  # warm-up
            (out, stats), secs = _timed(lambda: specdec.generate(model, prompt, return_stats=True, **kw, **extra))
            rows[f"{name}/{drafter}"] = dict(identical_to_hf=bool(torch.equal(out.to(ref.device), ref)),
                                             tokens_per_s=args.new_tokens / secs,
                                             acceptance=stats.acceptance_rate, tokens_per_step=stats.tokens_per_step)
            print(name, drafter, rows[f"{name}/{drafter}"])
    result = dict(environment=report.environment(), shape=args.shape, dtype="float32", split_devices=devices,
                  hf_unsplit_tokens_per_s=args.new_tokens / t_hf, rows=rows,
                  command="python -m benchmarks.multi_gpu " + " ".join(argv or []))
    report.write_json(result, Path(args.out) / "multi-gpu-device-map.json")
    return result


if __name__ == "__main__":
    main()
