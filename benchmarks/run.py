"""``specdec bench``: our generate vs HF generate vs HF assisted generation, side by side.

Every variant runs in this one process, on the same prompts, weights, dtype and
device, interleaved prompt by prompt (so drift on a shared machine hits all
variants alike). Greedy rows are checked token by token against ``hf``: in fp32
a row that differs is a failure, not a speedup; in bf16/fp16 the agreement is
reported (a (k+1)-token verify pass rounds differently from one-token steps).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import specdec
from benchmarks import report, workloads

log = logging.getLogger("specdec.bench")
LOOKUP_TOKENS = 10  # HF's usual prompt_lookup_num_tokens


class TimingStreamer:
    """Records when each chunk of new tokens arrives (HF puts the prompt first)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.counts, self._seen_prompt = device, [], [], False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())
        self.counts.append(value.numel())

    def end(self) -> None:
        pass


@dataclass
class Variant:
    name: str
    call: Callable  # (ids, mask, streamer) -> (sequences, stats or None)
    ours: bool = False
    k: int | str | None = None


@dataclass
class Sample:
    """One variant on one prompt."""

    new_tokens: list[int]
    ttft_s: float
    decode_s: float
    total_s: float
    stats: object = None
    peak_mem: int | None = None


@dataclass
class Tally:
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


def make_variants(model, draft, k_values: list, lookup: bool, assisted: bool, max_new: int,
                  graphs: bool = False, eager: bool = True, distilled=None) -> list[Variant]:
    """The side-by-side set. ``draft``: a model (or None) used by hf-assisted and ours-draft alike.

    ``distilled``: a second draft (a shipped distilled one) for an ``hf-assisted-distilled``
    and an ``ours-distilled`` row. ``graphs`` adds each of our variants again with
    ``compile=True`` (static cache + CUDA graphs), named with a ``+graphs`` suffix. A feature
    draft (``specdec.feature_draft``) is no causal LM: it gets no HF assisted row.
    """
    common = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)

    def hf(**kw):
        return lambda ids, mask, s: (model.generate(ids, attention_mask=mask, streamer=s, **common, **kw), None)

    def ours(**kw):
        return lambda ids, mask, s: specdec.generate(model, ids, mask, streamer=s, return_stats=True,
                                                     **common, **kw)

    hf_rows, our_rows = [("hf", {})], [("ours-plain", {}, None)]
    if lookup:
        hf_rows.append(("hf-lookup", dict(prompt_lookup_num_tokens=LOOKUP_TOKENS)))
        our_rows += [(_named("ours-lookup", k), dict(prompt_lookup_num_tokens=LOOKUP_TOKENS if k == "auto" else k,
                                                      num_draft_tokens=k), k) for k in k_values]
    if assisted and draft is not None:
        hf_rows += [("hf-assisted", dict(assistant_model=draft))] if hf_can_run(draft) else []
        our_rows += [(_named("ours-draft", k), dict(draft_model=draft, num_draft_tokens=k), k) for k in k_values]
    if assisted and distilled is not None:
        hf_rows += [("hf-assisted-distilled", dict(assistant_model=distilled))] if hf_can_run(distilled) else []
        our_rows.append(("ours-distilled", dict(draft_model=distilled, num_draft_tokens="auto"), "auto"))
    variants = [Variant(name, hf(**kw)) for name, kw in hf_rows]
    variants += [Variant(name, ours(**kw), ours=True, k=k) for name, kw, k in our_rows]
    if graphs:
        variants += [Variant(name + "+graphs", ours(compile=True, **kw), ours=True, k=k) for name, kw, k in our_rows
                     if getattr(kw.get("draft_model"), "supports_compile", True)]
    if graphs and not eager:
        variants = [v for v in variants if not v.ours or v.name.endswith("+graphs")]
    return variants


def hf_can_run(draft) -> bool:
    """HF assisted generation takes causal LMs only (not a feature draft)."""
    return callable(getattr(draft, "get_input_embeddings", None))


def _named(base: str, k) -> str:
    return base if k == "auto" else f"{base}-k{k}"


def measure(variant: Variant, ids: torch.Tensor, device: torch.device) -> Sample:
    streamer = TimingStreamer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out, stats = variant.call(ids, torch.ones_like(ids), streamer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new = sequences[0, ids.shape[1]:].tolist()
    first = streamer.times[0] if streamer.times else end
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return Sample(new, first - start, end - first, end - start, stats, peak)


def agreement(ref: list[int], got: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same token, length of the identical prefix)."""
    same = [a == b for a, b in zip(ref, got)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return (sum(same) / max(len(ref), 1)), prefix


def summarize(name: str, variant: Variant, tally: Tally, ref: Tally, ctx: dict) -> dict:
    row = dict(workload=ctx["workload"], variant=name, device=ctx["device"], dtype=ctx["dtype"], batch_size=1,
               n_prompts=len(tally.samples), max_new_tokens=ctx["max_new_tokens"], k=variant.k, error=tally.error)
    if tally.error or not tally.samples:
        return row
    s = tally.samples
    decoded = sum(len(x.new_tokens) - 1 for x in s)
    row.update(
        ttft_ms=1e3 * statistics.median(x.ttft_s for x in s),
        itl_ms=1e3 * sum(x.decode_s for x in s) / max(decoded, 1),
        decode_tok_s=decoded / sum(x.decode_s for x in s),
        e2e_tok_s=sum(len(x.new_tokens) for x in s) / sum(x.total_s for x in s),
        peak_mem_bytes=max((x.peak_mem or 0) for x in s) or None)
    _add_agreement(row, tally, ref, ctx)
    if variant.ours and s[0].stats is not None:
        _add_speculation(row, s)
    return row


def _add_agreement(row: dict, tally: Tally, ref: Tally, ctx: dict) -> None:
    pairs = [agreement(r.new_tokens, x.new_tokens) for r, x in zip(ref.samples, tally.samples)]
    row["agreement"] = sum(a for a, _ in pairs) / len(pairs)
    row["identical_prefix_len"] = min(p for _, p in pairs)
    row["identical_to_hf"] = all(a == 1.0 for a, _ in pairs)
    if ctx["dtype"] == "float32" and not row["identical_to_hf"]:
        row["error"] = f"greedy tokens differ from hf (agreement {row['agreement']:.3f})"


def _add_speculation(row: dict, samples: list[Sample]) -> None:
    proposed = sum(sum(x.stats.proposed) for x in samples)
    accepted = sum(sum(x.stats.accepted) for x in samples)
    forwards = sum(x.stats.target_forwards for x in samples)
    ks = [k for x in samples for k in x.stats.k_history]
    draft_s = sum(x.stats.draft_s for x in samples)
    verify_s = sum(x.stats.verify_s for x in samples)
    row["acceptance_rate"] = accepted / proposed if proposed else None
    row["tokens_per_step"] = sum(len(x.new_tokens) - 1 for x in samples) / max(forwards, 1)
    row["mean_k"] = sum(ks) / len(ks) if ks else 0.0
    row["draft_s"], row["verify_s"] = draft_s, verify_s
    row["draft_cost_ratio"] = (draft_s / max(sum(ks), 1)) / (verify_s / max(forwards, 1)) if ks and verify_s else None


def add_relative(rows: list[dict]) -> None:
    """Speedups vs hf and hf-assisted, and efficiency vs the theoretical speedup."""
    by = {r["variant"]: r for r in rows if r.get("decode_tok_s")}
    hf = by.get("hf")
    for r in rows:
        if not r.get("decode_tok_s"):
            continue
        plain = by.get("ours-plain+graphs" if r["variant"].endswith("+graphs") else "ours-plain")
        # HF assisted generation with the same draft: ours-distilled* against hf-assisted-distilled; a
        # feature draft (which HF cannot run) against the other one (see notes in the JSON)
        distilled = r["variant"].startswith("ours-distilled")
        names = ("hf-assisted-distilled", "hf-assisted") if distilled else ("hf-assisted", "hf-assisted-distilled")
        assisted = by.get(names[0]) or by.get(names[1])
        r["speedup_vs_hf"] = r["decode_tok_s"] / hf["decode_tok_s"] if hf else None
        r["speedup_vs_assisted"] = r["decode_tok_s"] / assisted["decode_tok_s"] if assisted else None
        if r["variant"].startswith("ours-plain"):
            continue
        a, c, k = r.get("acceptance_rate"), r.get("draft_cost_ratio"), r.get("mean_k")
        if a is not None and c is not None and plain and k:
            r["theoretical_speedup"] = report.theoretical_speedup(a, k, c)
            r["efficiency"] = report.efficiency(r["decode_tok_s"] / plain["decode_tok_s"], a, k, c)


def run_workload(model, tokenizer, draft, wl: workloads.Workload, args, device) -> list[dict]:
    k_values = ["auto"] + (list(range(1, 9)) if args.sweep_k else [])
    variants = make_variants(model, draft, k_values, lookup=True, assisted=not args.no_assisted,
                             max_new=args.max_new_tokens or wl.max_new_tokens, graphs=args.graphs,
                             eager=not args.no_eager, distilled=getattr(args, "distilled_draft", None))
    tallies = {v.name: Tally() for v in variants}
    encoded = [torch.tensor([workloads.encode(p, tokenizer, args.max_prompt_tokens)], device=device)
               for p in wl.prompts]
    _warm_up(variants, encoded[0], device)
    from tqdm.auto import tqdm

    for ids in tqdm(encoded, desc=f"bench {wl.name}", unit="prompt", disable=args.quiet):
        for v in variants:
            _run_one(v, ids, device, tallies[v.name])
    ctx = dict(workload=wl.name, device=report.environment()["device"], dtype=str(args.dtype),
               max_new_tokens=args.max_new_tokens or wl.max_new_tokens)
    rows = [summarize(v.name, v, tallies[v.name], tallies["hf"], ctx) for v in variants]
    add_relative(rows)
    return rows


def _run_one(v: Variant, ids, device, tally: Tally) -> None:
    if tally.error:
        return
    try:
        tally.samples.append(measure(v, ids, device))
    except Exception as exc:  # one failing variant must not lose the others
        tally.error = f"{type(exc).__name__}: {exc}"
        log.warning("%s failed: %s", v.name, tally.error)


def _warm_up(variants, ids, device) -> None:
    for v in variants:
        # graph variants warm up on a real prompt: their static cache is sized by prompt + output
        warm = ids if v.name.endswith("+graphs") else ids[:, -64:]
        try:
            v.call(warm, torch.ones_like(warm), None)
        except Exception:  # reported by the timed run
            pass


def load(args):
    from integrations.models import load_model

    from specdec.distill.shipped import feature_draft_path, load_feature_draft, load_named
    from specdec.generate import DISTILLED_NAMES

    model, tok = load_model(args.target, dtype=args.dtype, device=args.device)
    draft = None
    if args.draft and args.draft != "none":
        if args.draft in DISTILLED_NAMES:
            draft = load_named(model, args.draft)
        elif args.draft.startswith("self:"):
            draft = specdec.early_exit_model(model, int(args.draft.split(":")[1]))
        elif feature_draft_path(args.draft):
            draft = load_feature_draft(model, feature_draft_path(args.draft))
        else:
            draft, _ = load_model(args.draft, dtype=args.dtype, device=args.device)
    return model, tok, draft


def _distilled_draft(args, model, draft):
    """A shipped distilled draft for the extra rows, if wanted: the best one that fits the target
    and is not ``draft`` itself (so ``--draft distilled`` also gets the other kind's rows)."""
    if not args.distilled:
        return None
    from specdec.distill.shipped import find_shipped, load_named

    for name, kind in (("distilled-feature", "feature"), ("distilled-layers", "layers")):
        if find_shipped(model, kind) is not None and load_named(model, name) is not draft:
            return load_named(model, name)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specdec bench",
        description="Side-by-side speed of HF generate(), HF assisted/prompt-lookup generation and specdec "
                    "on real prompts (greedy, batch 1). Prints a markdown table and writes JSON.",
        epilog="Examples:\n  specdec bench --quick                 # CPU smoke run, default model\n"
               "  specdec bench --workload all --device cuda --dtype bfloat16 --plot\n"
               "  specdec bench --workload code --draft self:8 --sweep-k",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="code", choices=list(workloads.WORKLOADS) + ["all"],
                   help="which prompts (default: code: short prompts, quick on a CPU)")
    p.add_argument("--target", default=None, help="HF model dir, .gguf file or hub name (default: bundled SmolLM2-135M)")
    p.add_argument("--draft", default="self:4",
                   help="draft for hf-assisted and ours-draft: a model path, 'self:N' (target's first N layers), "
                        "'distilled' (the best shipped distilled draft; 'distilled-feature' / 'distilled-layers' "
                        "pick a kind; HF assisted rows cannot run a feature draft) or 'none' (default: self:4)")
    p.add_argument("--distilled", action=argparse.BooleanOptionalAction, default=None,
                   help="also run hf-assisted-distilled and ours-distilled rows with a shipped distilled draft (the "
                        "best one that is not --draft) "
                        "when one fits the target (default: on, off with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    p.add_argument("--n-prompts", type=int, default=None, help="prompts per workload (default: all; --quick: 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per prompt (default: the workload's)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer prompts in the middle")
    p.add_argument("--quick", action="store_true", help="a small run for CI/smoke tests (2 prompts, 32 tokens)")
    p.add_argument("--sweep-k", action="store_true", help="also run fixed k = 1..8 (for the speedup-vs-k plot)")
    p.add_argument("--no-assisted", action="store_true", help="skip hf-assisted and ours-draft rows")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also run our variants with compile=True (static cache + CUDA graphs); default: on CUDA")
    p.add_argument("--no-eager", action="store_true", help="with --graphs: skip our eager (compile=False) rows")
    p.add_argument("--plot", action="store_true", help="write PNG plots next to the JSON")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON (and PNG) results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.graphs is None:
        args.graphs = args.device.startswith("cuda")
    if args.quick:
        args.n_prompts = args.n_prompts or 2
        args.max_new_tokens = args.max_new_tokens or 32
        args.max_prompt_tokens = args.max_prompt_tokens or 768
    elif args.device == "cpu":  # the README's first command: minutes on a 2-core CPU
        args.n_prompts = args.n_prompts or 3
        args.max_new_tokens = args.max_new_tokens or 64
    if args.distilled is None:
        args.distilled = not args.quick
    model, tok, draft = load(args)
    args.distilled_draft = _distilled_draft(args, model, draft)
    args.notes = _notes(draft, args.distilled_draft)
    names = workloads.WORKLOADS if args.workload == "all" else (args.workload,)
    rows, fingerprints = [], {}
    for name in names:
        wl = workloads.get_workload(name, args.n_prompts)
        fingerprints[name] = wl.fingerprint
        rows += run_workload(model, tok, draft, wl, args, torch.device(args.device))
    return _publish(rows, args, fingerprints, model)


def _notes(draft, distilled) -> list[str]:
    """What a reader of the JSON must know about the drafts (a feature draft has no HF row)."""
    notes = []
    for row, d in (("ours-draft", draft), ("ours-distilled", distilled)):
        if d is not None and not hf_can_run(d):
            notes.append(f"{row} uses an EAGLE-style feature draft ({type(d).__name__}), which HF assisted generation "
                         "cannot run (it is no causal LM): its speedup_vs_assisted is against HF assisted generation with "
                         "the other (layered) draft")
    return notes


def _publish(rows, args, fingerprints, model) -> dict:
    env = report.environment()
    result = dict(environment=env, command="specdec bench " + " ".join(_argv_echo(args)),
                  model=str(args.target or "SmolLM2-135M-Instruct (bundled)"), draft=args.draft, dtype=args.dtype,
                  model_params=sum(p.numel() for p in model.parameters()), workloads=fingerprints,
                  notes=getattr(args, "notes", []), rows=rows)
    out = Path(args.out)
    stem = f"{time.strftime('%Y-%m-%d')}-{_slug(env['device'])}-{args.workload}"
    report.write_json(result, out / f"{stem}.json")
    print(report.markdown_table(rows))
    print(f"\nwrote {out / (stem + '.json')}")
    if args.plot:
        report.plot_speedup_vs_k(rows, out / f"{stem}-speedup-vs-k.png")
        report.plot_tokens_per_s(rows, out / f"{stem}-tokens-per-s.png")
    return result


def _argv_echo(args) -> list[str]:
    import sys

    return sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


if __name__ == "__main__":
    main()
