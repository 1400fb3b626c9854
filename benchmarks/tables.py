"""The markdown tables of README.md and docs/*.md, generated from committed results JSON.

    python -m benchmarks.tables            # rewrite every table between its markers, in place
    python -m benchmarks.tables --check    # exit 1 if a committed table differs from what the JSON gives

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->``, where NAME is a key of
``TABLES``. Each table is a function of the results files it names (paths relative to the
repository root) and of the directory of the document it goes into (for its links), so a number
in the docs is always one that a committed JSON file holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
DOCUMENTS = ("README.md", "docs/benchmarks.md", "docs/distill.md", "docs/design.md")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

# The shipped distilled draft's runs, with the plain and prompt-lookup rows of the same runs.
SHIPPED_DRAFT = {"code": f"{RESULTS}/h100/bench-code-smollm2-distilled-layers-bf16.json",
                 "chat": f"{RESULTS}/h100/bench-chat-smollm2-distilled-layers-bf16.json"}
FEATURE_DRAFT = {"code": f"{RESULTS}/h100/bench-code-smollm2-distilled-feature-bf16.json",
                 "chat": f"{RESULTS}/h100/bench-chat-smollm2-distilled-feature-bf16.json"}
SUMMARIZE = {"summarize": f"{RESULTS}/h100/bench-summarize-bf16.json"}
FP32 = f"{RESULTS}/h100/bench-code-fp32.json"
LONG = {"long": f"{RESULTS}/h100/bench-long-bf16.json"}
CPU_DEFAULT = {"code": f"{RESULTS}/cpu/code-smollm2-135m-cpu-2026-12-07.json",
               "prose": f"{RESULTS}/cpu/prose-smollm2-135m-cpu-2026-12-08.json"}
PAIR_CPU = {"code": f"{RESULTS}/cpu/code-qwen2.5-coder-1.5b-instruct-q4-k-m-cpu-2026-12-08.json",
            "prose": f"{RESULTS}/cpu/prose-qwen2.5-coder-1.5b-instruct-q4-k-m-cpu-2026-12-08.json"}
SWEEPS = {"code": f"{RESULTS}/h100/sweep-code-bf16.json", "summarize": f"{RESULTS}/h100/sweep-summarize-bf16.json"}
CPU_SWEEPS = {"code": f"{RESULTS}/cpu/2026-11-23-amd-epyc-code.json",
              "summarize": f"{RESULTS}/cpu/2026-11-23-amd-epyc-summarize.json"}
BATCH8 = f"{RESULTS}/h100/batch8-bf16.json"
ROOFLINE = f"{RESULTS}/h100/roofline-bf16.json"
ROOFLINE_INDUCTOR = f"{RESULTS}/h100/roofline-inductor-bf16.json"
ROOFLINE_8B = [f"{RESULTS}/h100/roofline-8b-inplace-kv.json", f"{RESULTS}/h100/roofline-8b-inplace-kv-repeat.json"]
PREFIX = {"1B eager": f"{RESULTS}/h100/prefix-h100-1b-eager.json",
          "1B `compile=True`": f"{RESULTS}/h100/prefix-h100-1b-graphs.json",
          "8B eager": f"{RESULTS}/h100/prefix-h100-8b-eager.json"}
ACCEPTANCE = f"{RESULTS}/cpu/draft-acceptance-smollm2-layers.json"
ACCEPTANCE_FEATURE = f"{RESULTS}/cpu/draft-acceptance-smollm2-feature.json"
ACCEPTANCE_GPU = f"{RESULTS}/h100/draft-acceptance-smollm2-gpu-fp32.json"
DRAFT_SPEED = f"{RESULTS}/cpu/draft-speed-smollm2-layers4-vs-layers6.json"
DRAFT_NAMES = {"plain": "no draft (plain decoding)", "layers4": "a 4-layer layered draft",
               "layers6-shipped": "`distilled-layers` (6 layers, shipped)"}
QUANT_QUALITY = f"{RESULTS}/quant-quality-cpu.json"
QUANT_SPEED = f"{RESULTS}/quant-speed-h100.json"
MULTI_GPU = f"{RESULTS}/h200x2-multi-gpu-device-map.json"
SPEC_VS_PLAIN_GPU = f"{RESULTS}/h100/spec-vs-plain-general-smollm2-135m-h100-2026-12-08.json"
PREFIX_TTFT_GPU = f"{RESULTS}/h100/prefix-ttft-smollm2-135m-h100-2026-12-07.json"
QUANT_GRAPHS = f"{RESULTS}/h100/quant-graphs-llama-8b-random-h100-2026-12-08.json"
PIPELINE_GPU = f"{RESULTS}/h100/pipeline-patched-vs-unpatched-smollm2-135m-h100-2026-12-08.json"

# What each bench variant is, in a user's words; {draft} is the run's --draft.
VARIANTS = {
    "hf": "`hf` (`model.generate`)",
    "hf-assisted": "`hf-assisted` (`assistant_model=` the same draft)",
    "hf-lookup": "`hf-lookup` (`prompt_lookup_num_tokens=10`)",
    "ours-plain": "ours, plain decoding, eager",
    "ours-lookup": "ours, prompt lookup, eager",
    "ours-draft": "ours, draft `{draft}`, eager",
    "ours-plain+graphs": "ours, plain decoding, `compile=True`",
    "ours-lookup+graphs": "ours, prompt lookup, `compile=True`",
    "ours-draft+graphs": "ours, draft `{draft}`, `compile=True`",
}
README_VARIANTS = ["hf", "hf-assisted", "hf-lookup", "ours-plain", "ours-draft", "ours-plain+graphs",
                   "ours-draft+graphs", "ours-lookup+graphs"]


def load(path: str) -> dict:
    """One results file, by its path relative to the repository root."""
    return json.loads((ROOT / path).read_text())


def link(path: str, base: str, text: str | None = None) -> str:
    """A markdown link to ``path`` (relative to the repository root) from a document in ``base``."""
    return f"[{text or Path(path).name}]({Path(os.path.relpath(ROOT / path, ROOT / base)).as_posix()})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _rows_by_variant(data: dict) -> dict[str, dict]:
    """Rows by variant; a row named after its draft (``ours-draft(D)+graphs``) counts as ``ours-draft+graphs``
    (the run's ``draft`` names D)."""
    return {re.sub(r"\([^)]*\)", "", row["variant"]): row for row in data["rows"] if not row.get("error")}


def _draft_name(data: dict) -> str | None:
    """The run's --draft as a user would name it: a directory or file by its last component."""
    draft = data.get("draft")
    return draft.rstrip("/").rsplit("/", 1)[-1] if isinstance(draft, str) else draft


def _environment(data: dict) -> str:
    env = data.get("environment", {})
    return f"{env.get('device', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"


def _ratio(row: dict, rows: dict[str, dict], baseline: str) -> float | None:
    """Decode tokens/s of ``row`` over the ``baseline`` row's of the same run (None if it did not run)."""
    base = rows.get(baseline)
    return row["decode_tok_s"] / base["decode_tok_s"] if base else None


def _speed(row: dict | None, rows: dict[str, dict]) -> str:
    if row is None:
        return "-"
    return f"{row['decode_tok_s']:.1f} ({_ratio(row, rows, 'hf'):.2f}x)"


def _agreement(row: dict) -> str:
    return "identical" if row.get("identical_to_hf") and row["dtype"] == "float32" else f"{row['agreement']:.2f}"


def bench_table(files: dict[str, str], variants: list[str], base: str) -> str:
    """Decode tokens/s (speedup over ``hf``) of ``variants`` in bench files, one column per workload."""
    data = {column: load(path) for column, path in files.items()}
    rows_by = {column: _rows_by_variant(d) for column, d in data.items()}
    first = next(iter(data.values()))
    present = [v for v in variants if any(v in rows for rows in rows_by.values())]
    body = [[VARIANTS[v].format(draft=_draft_name(first))] + [_speed(rows_by[c].get(v), rows_by[c]) for c in files]
            for v in present]
    row0 = first["rows"][0]
    sources = ", ".join(link(path, base, column) for column, path in files.items())
    note = (f"Decode tokens/s (speedup over `hf`). {_environment(first)}; {first.get('model')}, {row0['dtype']}, "
            f"batch {row0['batch_size']}, greedy, {row0['n_prompts']} prompts x {row0['max_new_tokens']} new tokens; "
            f"files: {sources}.")
    return _table(["variant"] + list(files), body) + "\n\n" + note


def bench_detail_table(files: dict[str, str], base: str, labels: dict[str, str] | None = None) -> str:
    """Every row of bench files: speed, tokens per target forward, acceptance and agreement with ``hf``.

    ``labels`` names variants that mean something particular in these runs (e.g. a second draft).
    """
    names = {**VARIANTS, **(labels or {})}
    body = []
    for column, path in files.items():
        data = load(path)
        rows = _rows_by_variant(data)
        assisted = "hf-assisted" if "hf-assisted" in rows else "hf-assisted-distilled"
        for variant, row in rows.items():
            label = names.get(variant, f"`{row['variant']}`").format(draft=_draft_name(data))
            tps = row.get("tokens_per_step")
            acc = row.get("acceptance_rate")
            vs_assisted = _ratio(row, rows, assisted)
            body.append([column, label, f"{row['decode_tok_s']:.1f}", f"{_ratio(row, rows, 'hf'):.2f}x",
                         f"{vs_assisted:.2f}x" if vs_assisted else "-", f"{tps:.2f}" if tps else "-",
                         f"{acc:.2f}" if acc is not None else "-", _agreement(row)])
    first = load(next(iter(files.values())))
    sources = ", ".join(link(path, base, column) for column, path in files.items())
    header = ["workload", "variant", "decode tok/s", "vs `hf`", "vs `hf-assisted`", "tokens / target forward",
              "acceptance", "agreement with `hf`"]
    return _table(header, body) + f"\n\n{_environment(first)}, {first['rows'][0]['dtype']}; files: {sources}."


def sweep_table(files: dict[str, str], base: str) -> str:
    """Prompt lookup with adaptive k against every fixed k (k-sweep bench files)."""
    body = []
    for workload, path in files.items():
        rows = _rows_by_variant(load(path))
        auto = next(r for v, r in rows.items() if v.startswith("ours-lookup") and "-k" not in v)
        fixed = {int(re.search(r"-k(\d+)", v).group(1)): r for v, r in rows.items() if re.search(r"lookup-k\d+", v)}
        best_k = max(fixed, key=lambda k: fixed[k]["decode_tok_s"])
        plain = next(r for v, r in rows.items() if v.startswith("ours-plain"))
        ratio = lambda r: f"{_ratio(r, rows, 'hf'):.2f}x"  # noqa: E731
        body.append([workload, ratio(auto), f"{ratio(fixed[best_k])} (k={best_k})", ratio(fixed[1]), ratio(plain),
                     link(path, base)])
    first = load(next(iter(files.values())))
    row0 = first["rows"][0]
    header = ["workload", "`num_draft_tokens=\"auto\"`", "best fixed k", "k = 1", "plain", "file"]
    note = (f"Decode speed over `hf` ({auto_variant_note(first)}). {_environment(first)}, {row0['dtype']}, "
            f"{row0['n_prompts']} prompts x {row0['max_new_tokens']} new tokens.")
    return _table(header, body) + "\n\n" + note


def auto_variant_note(data: dict) -> str:
    graphs = any(r["variant"].endswith("+graphs") for r in data["rows"])
    return "prompt lookup, `compile=True`" if graphs else "prompt lookup, eager"


def batch_table(path: str, base: str) -> str:
    """One batch of left-padded prompts of different lengths: end-to-end tokens/s of every variant."""
    data = load(path)
    body = []
    for row in data["rows"]:
        if row.get("error"):
            body.append([f"`{row['variant']}`", "refused: " + row["error"].split(": ", 1)[-1], "-", "-"])
        else:
            body.append([f"`{row['variant']}`", f"{row['e2e_tok_s']:.1f}", f"{row['speedup_vs_hf']:.2f}x",
                         f"{row['agreement']:.2f}"])
    row0 = data["rows"][0]
    note = (f"Batch {row0['batch_size']}, prompts of {min(data['prompt_tokens'])}-{max(data['prompt_tokens'])} "
            f"tokens, {row0['dtype']}, {row0['max_new_tokens']} new tokens, eager. {_environment(data)}; "
            f"file: {link(path, base)}.")
    return _table(["variant", "tokens/s", "vs `hf` batched", "agreement with `hf`"], body) + "\n\n" + note


ROOFLINE_VARIANTS = {"hf-eager": "HF eager", "hf-static-compile": "HF static cache + torch.compile",
                     "ours-eager": "ours eager", "ours-graphs": "ours `compile=True`",
                     "ours-inductor": "ours `compile=\"inductor\"`"}


def roofline_table(paths: list[str], base: str) -> str:
    """Tokens/s (fraction of the bandwidth roofline) per model shape and variant, one row per file and shape."""
    columns = [v for v in ROOFLINE_VARIANTS if any(v in s["variants"] for p in paths for s in load(p)["shapes"].values())]
    body = []
    for path in paths:
        data = load(path)
        tuned = " (tuned)" if data["settings"].get("coordinate_descent_tuning") else ""
        for shape, result in data["shapes"].items():
            cells = []
            for v in columns:
                r = result["variants"].get(v)
                cells.append(f"{r['tokens_per_s']:.1f} ({r['roofline_fraction']:.1%})" if r else "-")
            body.append([f"{shape}{tuned}", *cells, f"{result['roofline_tokens_per_s']:.0f}", link(path, base)])
    first = load(paths[0])
    settings = first["settings"]
    note = (f"Random weights, {settings['dtype']}, batch {settings['batch']}, {settings['prompt_tokens']}-token prompt, "
            f"{settings['new_tokens']} new tokens. Roofline = bytes read per step over the copy bandwidth measured in "
            f"the same run. {_environment(first)}. \"(tuned)\": Inductor with coordinate-descent tuning.")
    return _table(["shape", *[ROOFLINE_VARIANTS[v] for v in columns], "roofline tok/s", "file"], body) + "\n\n" + note


def prefix_table(files: dict[str, str], base: str) -> str:
    """Time to first token, prefix-cache miss vs hit, per shared-prefix length and model."""
    data = {name: load(path) for name, path in files.items()}
    lengths = sorted({r["shared_tokens"] for d in data.values() for r in d["rows"]})
    body = []
    for n in lengths:
        cells = []
        for d in data.values():
            r = next((r for r in d["rows"] if r["shared_tokens"] == n), None)
            cells.append(f"{r['ttft_miss_ms']:.1f} / {r['ttft_hit_ms']:.1f} ms ({r['hit_speedup']:.2f}x), "
                         f"{r['miss_overhead']:+.1%}" if r else "-")
        body.append([str(n), *cells])
    first = next(iter(data.values()))
    sources = ", ".join(link(path, base, name) for name, path in files.items())
    header = ["shared prefix (tokens)", *[f"{name}: miss / hit TTFT (speedup), full-miss overhead" for name in files]]
    note = (f"Random-weight Llamas, {first['dtype']}, a 16-token suffix after the shared prefix, median of repeats. "
            f"\"Full-miss overhead\": TTFT with a cache that misses everything over TTFT without a cache. "
            f"{_environment(first)}; files: {sources}.")
    return _table(header, body) + "\n\n" + note


def acceptance_table(drafts: dict[str, tuple[str, str]], base: str) -> str:
    """Held-out acceptance of drafts: {label: (file, key in the file's "drafts")}."""
    body, files = [], []
    for label, (path, key) in drafts.items():
        data = load(path)
        d = data["drafts"][key]
        body.append([DRAFT_NAMES.get(label, label), f"{d['code']['acceptance_rate']:.3f}", f"{d['code']['tokens_per_step']:.2f}",
                     f"{d['chat']['acceptance_rate']:.3f}", f"{d['chat']['tokens_per_step']:.2f}",
                     f"{d['mean']:.3f}" if isinstance(d["mean"], float) else f"{d['mean']['acceptance_rate']:.3f}",
                     link(path, base)])
        files.append(data)
    s = files[0]["settings"]
    header = ["draft", "code: accepted", "code: tokens / target forward", "chat: accepted", "chat: tokens / forward",
              "mean", "file"]
    note = (f"Greedy, k={s['k']}, {s['max_new_tokens']} new tokens, {s['dtype']} on {s['device']}, every held-out "
            f"prompt ({s['prompts']['code']} code, {s['prompts']['chat']} chat; training never saw them).")
    return _table(header, body) + "\n\n" + note


def draft_speed_table(path: str, base: str) -> str:
    """Decode tokens/s of drafts of different depths, one run, variants taking turns."""
    data = load(path)
    workloads = list(next(iter(data["variants"].values()))["workloads"])
    body = []
    for name, result in data["variants"].items():
        cells = []
        for w in workloads:
            r = result["workloads"][w]
            acc = f", acceptance {r['acceptance']:.2f}" if r.get("acceptance") is not None else ""
            cells.append(f"{r['tokens_per_s']:.1f} ({r['tokens_per_step']:.2f} tokens / forward{acc})")
        body.append([DRAFT_NAMES.get(name, f"`{name}`"), *cells])
    s = data["settings"]
    note = (f"Decode tokens/s, {s['dtype']} on {s['device']} ({_environment(data)}), batch {s['batch_size']}, greedy, "
            f"`num_draft_tokens={s['num_draft_tokens']!r}`, {s['max_new_tokens']} new tokens, "
            f"{s['prompts_per_workload']} prompts per workload; file: {link(path, base)}.")
    return _table(["draft", *workloads], body) + "\n\n" + note


def quant_quality_table(path: str, base: str) -> str:
    """Perplexity of every quantized variant against full precision."""
    data = load(path)
    body = [[f"`{name}`", f"{r['ppl']:.2f}", f"{r.get('delta_pct', 0.0):+.2f}%"]
            for name, r in data["results"].items() if "ppl" in r]
    note = (f"{data['model']}, {data['tokens']} tokens of {data['text']}, {data['device']}, torch {data['torch']}; "
            f"file: {link(path, base)}.")
    return _table(["variant", "perplexity", "vs fp32"], body) + "\n\n" + note


def quant_speed_table(path: str, base: str) -> str:
    """Batch-1 eager decode tokens/s of random-weight models with quantized weights."""
    data = load(path)
    body = []
    for size, variants in data["decode"].items():
        bf16 = variants["bf16"]["tokens_per_s"]
        body.append([size, *[f"{variants[v]['tokens_per_s']:.1f} ({variants[v]['tokens_per_s'] / bf16:.2f}x)"
                             for v in ("bf16", "int8", "int4")]])
    kv = data["kv_cache_bytes"]
    kv_note = ", ".join(f"{size}: int8 {r['int8_ratio']:.2f}x, int4 {r['int4_ratio']:.2f}x" for size, r in kv.items())
    note = (f"Random-weight Llamas, eager, {data['device']}, torch {data['torch']}. KV-cache bytes at "
            f"{data['settings']['kv_context']} tokens of context vs bf16: {kv_note}. File: {link(path, base)}.")
    return _table(["shape", "bf16 tok/s", "int8 weights", "int4 weights"], body) + "\n\n" + note


def multi_gpu_table(path: str, base: str) -> str:
    """A target split over GPUs with ``device_map="auto"``: identity with HF and tokens/s, unsplit vs split."""
    data = load(path)
    drafters = sorted({name.split("/", 1)[1] for name in data["rows"]}, key=list(
        name.split("/", 1)[1] for name in data["rows"]).index)
    body = []
    for drafter in drafters:
        unsplit, split = data["rows"].get(f"unsplit/{drafter}"), data["rows"].get(f"split/{drafter}")
        same = all(r["identical_to_hf"] for r in (unsplit, split) if r)
        body.append([f"`{drafter}`", f"{unsplit['tokens_per_s']:.1f}" if unsplit else "-",
                     f"{split['tokens_per_s']:.1f}" if split else "-", "yes" if same else "NO"])
    note = (f"Random {data['shape']} Llama, {data['dtype']}, split over {', '.join(data['split_devices'])}; HF "
            f"`generate()` unsplit: {data['hf_unsplit_tokens_per_s']:.1f} tokens/s. {_environment(data)}; "
            f"file: {link(path, base)}.")
    return _table(["drafter", "unsplit tok/s", "split tok/s", "identical to HF greedy"], body) + "\n\n" + note


def spec_vs_plain_table(path: str, base: str) -> str:
    """Speculation over our own plain decoding on the same path, per workload, batch and temperature."""
    data = load(path)
    body = []
    for r in data["rows"]:
        acc = "-" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.2f}"
        agree = "-" if r.get("agreement_with_plain") is None else f"{r['agreement_with_plain']:.3f}"
        body.append([r["workload"], str(r["batch_size"]), f"{r['temperature']:g}", r["variant"],
                     f"{r['tok_s']:.1f}", f"{r['spec_over_plain']:.2f}x", str(r.get("spec_steps", "-")), acc,
                     f"{r['tokens_per_step']:.2f}", agree])
    notes = " ".join(data.get("notes", []))
    note = (f"The default model, {data['dtype']}, {data['path']}, 128 new tokens. `lookup`: prompt lookup; "
            f"`distilled`: the shipped draft; both with `num_draft_tokens=\"auto\"`. {notes} "
            f"{_environment(data)}; file: {link(path, base)}.")
    return _table(["workload", "batch", "T", "variant", "tok/s", "over plain", "speculative steps", "acceptance",
                   "tokens/step", "greedy agreement with plain"], body) + "\n\n" + note


def prefix_ttft_table(path: str, base: str) -> str:
    """Prefix-cache TTFT on the default model: miss vs hit, eager and compile=True."""
    data = load(path)
    body = [[str(r["shared_tokens"]), "`compile=True`" if r["compile"] else "eager", f"{r['ttft_miss_ms']:.1f}",
             f"{r['ttft_hit_ms']:.1f}", f"{r['hit_speedup']:.2f}x", f"{r['miss_overhead']:+.1%}",
             "yes" if r["identical"] else "NO"] for r in data["rows"]]
    note = (f"The default model, {data['dtype']}, a shared prefix + a 16-token suffix, median of repeats. "
            f"{_environment(data)}; file: {link(path, base)}.")
    return _table(["shared prefix (tokens)", "path", "miss TTFT (ms)", "hit TTFT (ms)", "hit speedup",
                   "full-miss overhead", "same tokens"], body) + "\n\n" + note


def quant_graphs_table(path: str, base: str) -> str:
    """Quantized weights on the compiled path: tokens/s and the fraction of each one's own roofline."""
    data = load(path)
    body = [[r["variant"], r["path"], f"{r['tok_s']:.1f}" if r.get("tok_s") else "-",
             f"{r['roofline_fraction']:.0%}" if r.get("roofline_fraction") else "-",
             ", ".join(r.get("backends") or []) or "-", r.get("error") or ""] for r in data["rows"]]
    note = (f"A random Llama-3-8B shape, batch 1, 128 new tokens, `compile=True`; roofline = measured copy bandwidth "
            f"({data['copy_bandwidth_GBps']:.0f} GB/s) over the bytes each variant reads per token. int4 over bf16: "
            f"{data['int4_over_bf16_compiled']:.2f}x, int8 over bf16: {data['int8_over_bf16_compiled']:.2f}x. "
            f"{_environment(data)}; file: {link(path, base)}.")
    return _table(["weights", "path", "tok/s", "of its roofline", "kernel", "error"], body) + "\n\n" + note


def pipeline_table(path: str, base: str) -> str:
    """A patched text-generation pipeline against the same pipeline unpatched, per batch size."""
    data = load(path)
    names = {"pipeline": "`pipeline(...)` unpatched (HF `generate()`)",
             "patched-plain+graphs": "`patch(pipe, compile=True)`",
             "patched-lookup+graphs": "`patch(pipe, compile=True, prompt_lookup_num_tokens=10)`",
             "patched-distilled+graphs": "`patch(pipe, compile=True, draft_model=\"distilled\")`"}
    sizes = sorted({r["batch_size"] for r in data["rows"]})
    by = {(r["variant"], r["batch_size"]): r for r in data["rows"]}
    body = [[names.get(v, v)] + [f"{by[v, b]['tok_s']:.1f} ({by[v, b]['speedup_vs_pipeline']:.2f}x, "
                                 f"agreement {by[v, b]['agreement']:.2f})" if (v, b) in by else "-" for b in sizes]
            for v in names]
    note = (f"New tokens/s of a chat `pipeline(\"text-generation\")` (speedup over the unpatched pipeline; "
            f"agreement: share of tokens equal to the unpatched pipeline's, bf16). {data['model']}, {data['dtype']}, "
            f"{data['rows'][0]['n_prompts']} chat prompts x 128 new tokens, greedy. {_environment(data)}; "
            f"file: {link(path, base)}.")
    return _table(["pipeline"] + [f"batch {b}" for b in sizes], body) + "\n\n" + note


TABLES: dict[str, Callable[[str], str]] = {
    "pipeline-gpu": lambda base: pipeline_table(PIPELINE_GPU, base),
    "speedup": lambda base: bench_table(SHIPPED_DRAFT, README_VARIANTS, base),
    "speedup-detail": lambda base: bench_detail_table(SHIPPED_DRAFT, base, {
        "ours-distilled": "ours, draft `distilled-feature`, eager",
        "ours-distilled+graphs": "ours, draft `distilled-feature`, `compile=True`"}),
    "summarize": lambda base: bench_table(SUMMARIZE, list(VARIANTS), base),
    "fp32": lambda base: bench_detail_table({"code": FP32}, base),
    "long": lambda base: bench_table(LONG, list(VARIANTS), base),
    "cpu-default": lambda base: bench_detail_table(CPU_DEFAULT, base),
    "pair-cpu": lambda base: bench_detail_table(PAIR_CPU, base),
    "feature-draft": lambda base: bench_detail_table(FEATURE_DRAFT, base, {
        "hf-assisted-distilled": "`hf-assisted` (`assistant_model=` a 4-layer layered draft)",
        "ours-distilled": "ours, the 4-layer layered draft, eager",
        "ours-distilled+graphs": "ours, the 4-layer layered draft, `compile=True`"}),
    "sweep": lambda base: sweep_table(SWEEPS, base),
    "sweep-cpu": lambda base: sweep_table(CPU_SWEEPS, base),
    "batch": lambda base: batch_table(BATCH8, base),
    "roofline": lambda base: roofline_table([ROOFLINE, ROOFLINE_INDUCTOR, *ROOFLINE_8B], base),
    "prefix": lambda base: prefix_table(PREFIX, base),
    "acceptance": lambda base: acceptance_table({
        "`distilled-layers` (6 layers, shipped)": (ACCEPTANCE, "layers6-shipped"),
        "`distilled-feature` (1 layer on the target's features, shipped)": (ACCEPTANCE_FEATURE, "feature-shipped"),
    }, base),
    "acceptance-gpu": lambda base: acceptance_table({
        name: (ACCEPTANCE_GPU, name) for name in ("layers4", "layers6-shipped")}, base),
    "draft-speed": lambda base: draft_speed_table(DRAFT_SPEED, base),
    "quant-quality": lambda base: quant_quality_table(QUANT_QUALITY, base),
    "quant-speed": lambda base: quant_speed_table(QUANT_SPEED, base),
    "multi-gpu": lambda base: multi_gpu_table(MULTI_GPU, base),
    "spec-vs-plain-gpu": lambda base: spec_vs_plain_table(SPEC_VS_PLAIN_GPU, base),
    "prefix-ttft-gpu": lambda base: prefix_ttft_table(PREFIX_TTFT_GPU, base),
    "quant-graphs": lambda base: quant_graphs_table(QUANT_GRAPHS, base),
}


def render(text: str, base: str, tables: dict[str, Callable[[str], str]] = TABLES) -> str:
    """``text`` with every marked table regenerated; ``base`` is the document's directory (for links)."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in tables:
            raise ValueError(f"unknown table {name!r} (known: {', '.join(sorted(tables))}): fix the marker")
        return f"{match[1]}{tables[name](base)}\n{match[4]}"

    if len(re.findall(r"<!-- table:[\w-]+ -->", text)) != len(MARKER.findall(text)):
        raise ValueError("a '<!-- table:NAME -->' marker has no '<!-- /table -->' after it")
    return MARKER.sub(fill, text)


def update(documents: tuple[str, ...] = DOCUMENTS, check: bool = False) -> list[str]:
    """Regenerate the tables of ``documents`` (paths relative to the root); return those that changed.

    With ``check``, write nothing: the returned list is the documents whose tables are stale.
    """
    changed = []
    for doc in documents:
        path = ROOT / doc
        if not path.exists():
            continue
        text = path.read_text()
        new = render(text, str(Path(doc).parent))
        if new != text:
            changed.append(doc)
            if not check:
                path.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tables",
        description="Regenerate the markdown tables of README.md and docs/ from the JSON in benchmarks/results/.",
        epilog="examples:\n  python -m benchmarks.tables           # after committing new results\n"
               "  python -m benchmarks.tables --check   # in CI: fail if a table was typed or is stale",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table differs from the JSON")
    args = p.parse_args(argv)
    changed = update(check=args.check)
    for doc in changed:
        print(f"{doc}: {'stale tables' if args.check else 'tables regenerated'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
