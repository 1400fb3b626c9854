"""``specdec bench``: our generate vs HF generate vs HF assisted generation, side by side.

Every variant runs in this one process, on the same prompts, weights, dtype and
device, interleaved batch by batch (so drift on a shared machine hits all variants
alike). Greedy rows are checked token by token against ``hf``: in fp32 a row that
differs is a failure, not a speedup; in bf16/fp16 the agreement is reported (a
(k+1)-token verify pass rounds differently from one-token steps). Sampled rows report
speed only.

Rows: ``hf``, ``hf-lookup``, ``hf-assisted(D)``, ``ours-plain``, ``ours-lookup`` and
``ours-draft(D)``, where ``D`` names the draft model; with ``--graphs`` our rows again
with a ``+graphs`` suffix (static cache + CUDA graphs). ``spec_over_plain`` is a
speculative row's decode tokens/s over ``ours-plain`` on the same path (eager or graphs).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import specdec

from . import report, workloads

log = logging.getLogger("specdec.bench")
LOOKUP_TOKENS = 10  # HF's usual prompt_lookup_num_tokens
DEFAULT_MODEL_DRAFT = "distilled-layers"  # the draft shipped for the bundled default model

# transformers messages that HF's own assisted generation triggers inside generate() (it hands
# the assistant a generation_config and a min-length processor of its own): not the caller's doing
_HF_NOISE = ("Passing `generation_config` together with generation-related arguments",
             "A custom logits processor of type")


class TimingStreamer:
    """Records when each chunk of new tokens arrives (HF puts the prompt first)."""

    def __init__(self):
        self.times, self.counts, self._seen_prompt = [], [], False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())
        self.counts.append(value.numel())

    def end(self) -> None:
        pass


@dataclass
class Draft:
    """A draft model and the label that row names show (``ours-draft(label)``)."""

    label: str
    model: object


@dataclass
class Variant:
    name: str
    call: Callable  # (ids, mask, streamer, **generate_overrides) -> (sequences, stats or None)
    ours: bool = False
    k: int | str | None = None
    draft: str | None = None  # label of the draft model, if the row uses one
    graphs: bool = False  # our compile=True path


@dataclass
class Sample:
    """One variant on one batch of prompts."""

    new_tokens: list[list[int]]  # per row
    ttft_s: float
    decode_s: float
    total_s: float
    stats: object = None
    peak_mem: int | None = None


@dataclass
class Tally:
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


# --------------------------------------------------------------------------------------
# Variants


def make_variants(model, drafts: list[Draft], *, gen: dict, k_values=("auto",), lookup: bool = True,
                  graphs: bool = False, eager: bool = True, batch_size: int = 1) -> tuple[list[Variant], list[str]]:
    """The side-by-side set, and notes on rows left out.

    ``drafts``: each gets an ``hf-assisted(label)`` row (when HF can run it, at batch 1) and
    ``ours-draft(label)`` rows. ``gen``: generation keywords shared by every row. ``graphs``
    adds each of our rows again with ``compile=True``, named with a ``+graphs`` suffix.
    """
    notes = []

    def hf(**kw):
        def call(ids, mask, s, **override):
            with quiet_hf():
                return model.generate(ids, attention_mask=mask, streamer=s, **{**gen, **override}, **kw), None
        return call

    def ours(**kw):
        def call(ids, mask, s, **override):
            return specdec.generate(model, ids, mask, streamer=s, return_stats=True, **{**gen, **override}, **kw)
        return call

    hf_rows = [("hf", {}, None)]
    our_rows = [("ours-plain", {}, None, None)]
    if lookup:
        hf_rows.append(("hf-lookup", dict(prompt_lookup_num_tokens=LOOKUP_TOKENS), None))
        our_rows += [(_named("ours-lookup", k), dict(prompt_lookup_num_tokens=LOOKUP_TOKENS if k == "auto" else k,
                                                      num_draft_tokens=k), k, None) for k in k_values]
    for d in drafts:
        if hf_can_run(d.model):
            hf_rows.append((f"hf-assisted({d.label})", dict(assistant_model=d.model), d.label))
        else:
            notes.append(f"no hf-assisted({d.label}) row: {type(d.model).__name__} is no causal LM, HF assisted "
                         "generation cannot run it")
        our_rows += [(_named(f"ours-draft({d.label})", k), dict(draft_model=d.model, num_draft_tokens=k), k, d.label)
                     for k in k_values]
    if batch_size > 1:
        skipped = [name for name, kw, _ in hf_rows if kw]
        hf_rows = [row for row in hf_rows if not row[1]]
        if skipped:
            notes.append(f"{', '.join(skipped)} skipped: HF assisted generation and prompt lookup run batch 1 only")
    variants = [Variant(name, hf(**kw), draft=label) for name, kw, label in hf_rows]
    if eager or not graphs:
        variants += [Variant(name, ours(**kw), ours=True, k=k, draft=label) for name, kw, k, label in our_rows]
    if graphs:
        variants += [Variant(name + "+graphs", ours(compile=True, **kw), ours=True, k=k, draft=label, graphs=True)
                     for name, kw, k, label in our_rows if getattr(kw.get("draft_model"), "supports_compile", True)]
    return variants, notes


def hf_can_run(draft) -> bool:
    """HF assisted generation takes causal LMs only (not a feature draft)."""
    return callable(getattr(draft, "get_input_embeddings", None))


def _named(base: str, k) -> str:
    return base if k == "auto" else f"{base}-k{k}"


@contextlib.contextmanager
def quiet_hf():
    """Drop the transformers messages listed in ``_HF_NOISE`` (and nothing else) while inside."""

    def keep(record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _HF_NOISE)

    handlers = logging.getLogger("transformers").handlers + logging.getLogger().handlers
    for h in handlers:
        h.addFilter(keep)
    try:
        with warnings.catch_warnings():
            for text in _HF_NOISE:
                warnings.filterwarnings("ignore", message=".*" + text.replace("`", "."))
            yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


# --------------------------------------------------------------------------------------
# Measuring


def measure(variant: Variant, ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> Sample:
    """Run one variant on one (left-padded) batch. HF rows stream at any batch size (the
    streamer times the first token); ours streams at batch 1 and reports its prefill time
    otherwise."""
    streamer = TimingStreamer() if not variant.ours or ids.shape[0] == 1 else None
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out, stats = variant.call(ids, mask, streamer)
    _sync(device)
    end = time.perf_counter()
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new = [row[ids.shape[1]:].tolist() for row in sequences]
    if streamer is not None:
        first = streamer.times[0] if streamer.times else end
    else:
        first = start + stats.prefill_s
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return Sample(new, first - start, end - first, end - start, stats, peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def agreement(ref: list[int], got: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same token, length of the identical prefix)."""
    same = [a == b for a, b in zip(ref, got)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return (sum(same) / max(len(ref), 1)), prefix


def summarize(variant: Variant, tally: Tally, ref: Tally, ctx: dict) -> dict:
    """One result row (``benchmarks.report`` schema) from a variant's samples."""
    row = report.new_row(workload=ctx["workload"], variant=variant.name, draft=variant.draft, device=ctx["device"],
                         dtype=ctx["dtype"], batch_size=ctx["batch_size"], do_sample=ctx["do_sample"],
                         n_prompts=ctx["n_prompts"], max_new_tokens=ctx["max_new_tokens"], k=variant.k,
                         compile=variant.graphs, error=tally.error)
    if tally.error or not tally.samples:
        return row
    s = tally.samples
    new = sum(len(r) for x in s for r in x.new_tokens)
    decoded = sum(len(r) - 1 for x in s for r in x.new_tokens)
    row.update(
        new_tokens=new,
        ttft_ms=1e3 * statistics.median(x.ttft_s for x in s),
        itl_ms=1e3 * sum(x.decode_s for x in s) / max(decoded / ctx["batch_size"], 1),
        decode_tok_s=decoded / max(sum(x.decode_s for x in s), 1e-9),
        e2e_tok_s=new / sum(x.total_s for x in s),
        prompt_seconds=[round(x.total_s, 4) for x in s],
        peak_mem_bytes=max((x.peak_mem or 0) for x in s) or None)
    if not ctx["do_sample"]:
        _add_agreement(row, tally, ref, ctx)
    if variant.ours and s[0].stats is not None:
        _add_speculation(row, s)
    return row


def _add_agreement(row: dict, tally: Tally, ref: Tally, ctx: dict) -> None:
    if ref.error or len(ref.samples) != len(tally.samples):
        return
    pairs = [agreement(r, x) for a, b in zip(ref.samples, tally.samples) for r, x in zip(a.new_tokens, b.new_tokens)]
    row["agreement"] = sum(a for a, _ in pairs) / len(pairs)
    row["identical_prefix_len"] = min(p for _, p in pairs)
    row["identical_to_hf"] = all(a == 1.0 for a, _ in pairs)
    if ctx["dtype"] == "float32" and not row["identical_to_hf"]:
        row["error"] = f"greedy tokens differ from hf (agreement {row['agreement']:.3f})"


def _add_speculation(row: dict, samples: list[Sample]) -> None:
    stats = [x.stats for x in samples]
    proposed = sum(sum(st.proposed) for st in stats)
    accepted = sum(sum(st.accepted) for st in stats)
    steps = sum(sum(st.steps) for st in stats)
    ks = [k for st in stats for k in st.k_history]
    forwards = sum(st.target_forwards for st in stats)
    draft_s, verify_s = sum(st.draft_s for st in stats), sum(st.verify_s for st in stats)
    decoded = sum(max(n - 1, 0) for st in stats for n in st.new_tokens)
    row["acceptance_rate"] = accepted / proposed if proposed else None
    row["tokens_per_step"] = decoded / steps if steps else None
    row["k_mean"] = sum(ks) / len(ks) if ks else 0.0
    row["draft_s"], row["verify_s"] = draft_s, verify_s
    row["draft_cost_ratio"] = (draft_s / max(sum(ks), 1)) / (verify_s / max(forwards, 1)) if ks and verify_s else None


def add_relative(rows: list[dict]) -> None:
    """Speedups vs hf, vs hf-assisted with the same draft, vs our plain row on the same path
    (``spec_over_plain``), and efficiency vs the theoretical speedup."""
    by = {r["variant"]: r for r in rows if r.get("decode_tok_s")}
    hf = by.get("hf")
    for r in rows:
        if not r.get("decode_tok_s"):
            continue
        plain = by.get("ours-plain+graphs" if r["variant"].endswith("+graphs") else "ours-plain")
        assisted = by.get(f"hf-assisted({r['draft']})") if r.get("draft") else None
        r["speedup_vs_hf"] = r["decode_tok_s"] / hf["decode_tok_s"] if hf else None
        r["speedup_vs_assisted"] = r["decode_tok_s"] / assisted["decode_tok_s"] if assisted else None
        if assisted and r.get("prompt_seconds") and len(r["prompt_seconds"]) == len(assisted.get("prompt_seconds") or []):
            r["worst_prompt_vs_assisted"] = min(a / o for a, o in zip(assisted["prompt_seconds"], r["prompt_seconds"]))
        if not r["variant"].startswith("ours-") or r["variant"].startswith("ours-plain"):
            continue
        r["spec_over_plain"] = r["decode_tok_s"] / plain["decode_tok_s"] if plain else None
        a, c, k = r.get("acceptance_rate"), r.get("draft_cost_ratio"), r.get("k_mean")
        if a is not None and c is not None and plain and k:
            r["theoretical_speedup"] = report.theoretical_speedup(a, k, c)
            r["efficiency"] = report.efficiency(r["spec_over_plain"], a, k, c)


# --------------------------------------------------------------------------------------
# Running a workload


def batches(encoded: list[list[int]], size: int, pad_id: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prompts grouped ``size`` at a time (the last group may be smaller), left-padded."""
    out = []
    for i in range(0, len(encoded), size):
        group = encoded[i:i + size]
        width = max(len(g) for g in group)
        ids = torch.tensor([[pad_id] * (width - len(g)) + g for g in group], device=device)
        mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group], device=device)
        out.append((ids, mask))
    return out


def generation_kwargs(args, max_new: int, pad_id: int) -> dict:
    """Keywords every row passes to generate(): all rows make exactly ``max_new`` tokens."""
    gen = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=args.sample, pad_token_id=pad_id)
    if args.sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    return gen


def run_workload(model, tokenizer, drafts: list[Draft], wl: workloads.Workload, args, device) -> tuple[list, list]:
    """Rows and notes of one workload."""
    max_new = args.max_new_tokens or wl.max_new_tokens
    pad_id = pad_token_id(tokenizer)
    k_values = ["auto"] + (list(range(1, 9)) if args.sweep_k else [])
    variants, notes = make_variants(model, drafts, gen=generation_kwargs(args, max_new, pad_id), k_values=k_values,
                                    graphs=args.graphs, eager=not args.no_eager, batch_size=args.batch_size)
    tallies = {v.name: Tally() for v in variants}
    encoded = [workloads.encode(p, tokenizer, args.max_prompt_tokens) for p in wl.prompts]
    groups = batches(encoded, args.batch_size, pad_id, device)
    _warm_up(variants, groups[0], device)
    bars = _progress_bars(variants, len(groups), wl.name, args.quiet, "prompt" if args.batch_size == 1 else "batch")
    for ids, mask in groups:
        for v in variants:
            _run_one(v, ids, mask, device, tallies[v.name])
            bars[v.name].update(1)
    for bar in bars.values():
        bar.close()
    ctx = dict(workload=wl.name, device=report.environment()["device"], dtype=str(args.dtype), max_new_tokens=max_new,
               batch_size=args.batch_size, do_sample=args.sample, n_prompts=len(encoded))
    rows = [summarize(v, tallies[v.name], tallies["hf"], ctx) for v in variants]
    for r in rows:
        r["prompt_tokens"] = sum(map(len, encoded)) / len(encoded)
    add_relative(rows)
    return rows, notes


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _progress_bars(variants, total: int, workload: str, quiet: bool, unit: str) -> dict:
    """One bar per row (variant), advanced after each batch of prompts."""
    from tqdm.auto import tqdm

    width = max(len(v.name) for v in variants)
    return {v.name: tqdm(total=total, desc=f"{workload} {v.name:<{width}}", unit=unit, position=i, leave=True,
                         disable=quiet, dynamic_ncols=True) for i, v in enumerate(variants)}


def _run_one(v: Variant, ids, mask, device, tally: Tally) -> None:
    if tally.error:
        return
    try:
        tally.samples.append(measure(v, ids, mask, device))
    except Exception as exc:  # one failing variant must not lose the others
        tally.error = f"{type(exc).__name__}: {exc}"
        log.warning("%s failed: %s", v.name, tally.error)


def _warm_up(variants, batch, device) -> None:
    """One untimed call per variant. Graph variants warm up on a real prompt and length (their
    static cache is sized by prompt + output); eager ones on a short prompt and a few tokens."""
    ids, mask = batch
    for v in variants:
        short = {} if v.graphs else dict(max_new_tokens=8, min_new_tokens=8)
        warm = (ids, mask) if v.graphs else (ids[:, -64:], mask[:, -64:])
        try:
            v.call(*warm, None, **short)
        except Exception:  # reported by the timed run
            pass


# --------------------------------------------------------------------------------------
# Loading


def load(args):
    """``(target, tokenizer, drafts)`` as the arguments ask."""
    from specdec.integrations.models import load_model

    with _no_load_bars():
        model, tok = load_model(args.target, dtype=args.dtype, device=args.device)
        specs = ([] if args.draft in (None, "none") else [args.draft]) + list(args.also_draft or [])
        drafts = [load_draft(spec, model, args) for spec in specs]
    return model, tok, drafts


def default_draft(target) -> str:
    """The draft used when ``--draft`` is not given: the shipped distilled one for the bundled
    default model, none for any other target."""
    return DEFAULT_MODEL_DRAFT if target in (None, "default") else "none"


def load_draft(spec: str, model, args) -> Draft:
    """A draft from ``--draft``: a shipped distilled name, ``self:N``, a feature-draft file or a
    model path (HF directory or .gguf)."""
    from specdec.integrations.models import load_model
    from specdec.distill.shipped import best_kind, feature_draft_path, load_feature_draft, load_named
    from specdec.generate import DISTILLED_NAMES

    if spec in DISTILLED_NAMES:
        label = spec if spec != "distilled" else f"distilled-{best_kind(model)}"
        return Draft(label, load_named(model, spec))
    if spec.startswith("self:"):
        if not spec[5:].isdigit():
            raise ValueError(f"--draft {spec!r}: write self:N with N the number of the target's first layers")
        return Draft(spec, specdec.early_exit_model(model, int(spec[5:])))
    if feature_draft_path(spec):
        return Draft(model_label(spec), load_feature_draft(model, feature_draft_path(spec)))
    draft, _ = load_model(spec, dtype=args.dtype, device=args.device)
    return Draft(model_label(spec), draft)


def model_label(spec) -> str:
    """Short name of a model argument: the directory or file name (no .gguf), or the hub name's tail."""
    if spec in (None, "default"):
        return "smollm2-135m"
    name = Path(str(spec).rstrip("/")).name
    return name.removesuffix(".gguf").removesuffix(".safetensors")


@contextlib.contextmanager
def _no_load_bars():
    """No "Loading weights" progress bars from transformers while models load."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specdec bench",
        description="Side-by-side speed of HF generate(), HF assisted/prompt-lookup generation and specdec "
                    "on real prompts. Prints a table, a legend and a verdict, and writes JSON (and a PNG plot).",
        epilog="Examples:\n"
               "  specdec bench                          # a few minutes on a CPU, default model + its draft\n"
               "  specdec bench --quick                  # a smoke run\n"
               "  specdec bench --target big/ --draft small/ --workload prose\n"
               "  specdec bench --device cuda --dtype bfloat16 --graphs --batch-size 4 --sample --temperature 0.7",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="code", choices=list(workloads.WORKLOADS) + ["all"],
                   help="which prompts (default: code)")
    p.add_argument("--target", default=None, help="HF model dir, .gguf file or hub name (default: bundled SmolLM2-135M)")
    p.add_argument("--draft", default=None,
                   help="draft for the hf-assisted(D) and ours-draft(D) rows: a model path (HF dir or .gguf), "
                        "'self:N' (the target's first N layers), 'distilled' (the best shipped distilled draft; "
                        "'distilled-layers' / 'distilled-feature' pick a kind) or 'none' (default: "
                        f"{DEFAULT_MODEL_DRAFT} for the bundled default model, else none)")
    p.add_argument("--also-draft", action="append", metavar="DRAFT",
                   help="more draft rows, same forms as --draft (repeatable), e.g. --also-draft distilled-feature")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="prompts decoded together (left-padded); HF assisted/lookup rows run batch 1 only and are "
                        "skipped above it (default: 1)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy (rows report speed only)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample, in (0, 1] (default: 1.0)")
    p.add_argument("--n-prompts", type=_positive_int, default=None,
                   help="prompts per workload (default: the workload's set; --quick: 2; on a CPU without --full: 3)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="new tokens per prompt (default: the workload's; --quick: 32; on a CPU without --full: 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer prompts in the middle")
    p.add_argument("--quick", action="store_true", help="a smoke run (2 prompts, 32 tokens)")
    p.add_argument("--full", action="store_true", help="every prompt of the workload, its full length, on a CPU too")
    p.add_argument("--sweep-k", action="store_true", help="also run fixed k = 1..8 (for the speedup-vs-k plot)")
    p.add_argument("--no-assisted", action="store_true", help="no draft-model rows (same as --draft none)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also run our variants with compile=True (static cache + CUDA graphs); default: on CUDA")
    p.add_argument("--no-eager", action="store_true", help="with --graphs: skip our eager (compile=False) rows")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write a PNG next to the JSON (default: when matplotlib is installed)")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON (and PNG) results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give an int >= 1")
    return int(text)


def _defaults(args) -> None:
    """Fill the defaults that depend on other arguments, and check what argparse cannot."""
    if args.quick and args.full:
        raise ValueError("--quick and --full contradict each other: pick one")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise ValueError("--sample needs --temperature > 0 and --top-p in (0, 1]")
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.graphs is None:
        args.graphs = args.device.startswith("cuda")
    if args.draft is None:
        args.draft = default_draft(args.target)
    if args.no_assisted:
        args.draft, args.also_draft = "none", []
    if args.quick:
        args.n_prompts = args.n_prompts or 2
        args.max_new_tokens = args.max_new_tokens or 32
        args.max_prompt_tokens = args.max_prompt_tokens or 768
    elif args.device == "cpu" and not args.full:  # the README's first command: minutes on a 2-core CPU
        args.n_prompts = args.n_prompts or 3
        args.max_new_tokens = args.max_new_tokens or 64
    if args.plot is None:
        args.plot = _has_matplotlib()


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    _defaults(args)
    model, tok, drafts = load(args)
    names = workloads.WORKLOADS if args.workload == "all" else (args.workload,)
    rows, notes, fingerprints = [], [], {}
    for name in names:
        n = None if args.n_prompts is None else min(args.n_prompts, len(workloads.get_workload(name).prompts))
        wl = workloads.get_workload(name, n)
        fingerprints[name] = wl.fingerprint
        wl_rows, wl_notes = run_workload(model, tok, drafts, wl, args, torch.device(args.device))
        rows += wl_rows
        notes += [n for n in wl_notes if n not in notes]
    return _publish(rows, notes, args, fingerprints, model)


def result_file(args, env: dict) -> Path:
    """``<out>/<workload>-<model>-<device>[-bsN][-sampled]-<date>.json``: what the file measures."""
    settings = ([f"bs{args.batch_size}"] if args.batch_size > 1 else []) + (["sampled"] if args.sample else [])
    return report.result_path(args.out, env, args.workload, model_label(args.target), tuple(settings))


def _publish(rows, notes, args, fingerprints, model) -> dict:
    env = report.environment()
    result = dict(environment=env, command="specdec bench " + " ".join(_argv_echo()),
                  model=str(args.target or "SmolLM2-135M-Instruct (bundled)"), draft=args.draft,
                  also_draft=args.also_draft or [], dtype=args.dtype, batch_size=args.batch_size,
                  do_sample=args.sample, temperature=args.temperature if args.sample else None,
                  top_p=args.top_p if args.sample else None,
                  model_params=sum(p.numel() for p in model.parameters()), workloads=fingerprints,
                  notes=notes, rows=rows)
    path = report.write_json(result, result_file(args, env))
    print()
    for name in fingerprints:
        wl_rows = [r for r in rows if r["workload"] == name]
        print(f"## {name} ({_setting_line(args, wl_rows)})\n")
        print(report.bench_table(wl_rows))
        print(report.verdict(wl_rows))
        print()
    print(report.BENCH_LEGEND)
    for note in notes:
        print(f"note: {note}")
    print(f"\nresults: {path}")
    if args.plot:
        print(f"plot:    {report.plot_tokens_per_s(rows, path.with_suffix('.png'))}")
        if args.sweep_k:
            print(f"plot:    {report.plot_speedup_vs_k(rows, path.with_name(path.stem + '-speedup-vs-k.png'))}")
    return result


def _setting_line(args, rows) -> str:
    r = rows[0] if rows else {}
    how = f"sampled, T={args.temperature}, top-p={args.top_p}" if args.sample else "greedy"
    return (f"{model_label(args.target)}, {args.device} {args.dtype}, batch {args.batch_size}, {how}, "
            f"{r.get('n_prompts')} prompts x {r.get('max_new_tokens')} new tokens")


def _argv_echo() -> list[str]:
    import sys

    return sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]


if __name__ == "__main__":
    main()
