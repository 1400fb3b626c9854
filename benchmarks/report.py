"""Benchmark reporting: pure functions over result rows (markdown tables, JSON, plots).

A result row is a plain dict, one per (workload, variant, settings) measured. Every key of
``ROW_FIELDS`` may be present; a missing key means "not measured" (same as ``None``).
:func:`new_row` builds one with every key (typos raise), :func:`derive` fills the computed
ones (speedups, theoretical speedup, efficiency) from the measured ones.

Row schema (units in the names; ``None`` = not measured / not applicable):

=====================  =======================================================================
workload               "code" | "chat" | "summarize" | "long" | "sessions" | ...
variant                "hf", "hf-assisted(D)", "hf-lookup", "ours-draft(D)", "ours-lookup", ... (D: the draft)
draft                  label of the draft model the row uses (None: no draft model)
compile                True for our compile=True rows (static cache + CUDA graphs, "+graphs")
device                 device name (e.g. "NVIDIA H100 80GB HBM3", "cpu")
dtype                  "float32" | "bfloat16" | "float16"
batch_size             rows decoded together
n_prompts              prompts measured
max_new_tokens         generation budget per prompt
do_sample              False for greedy (identity is checked), True for sampling (speed only)
prompt_tokens          mean prompt length in tokens
new_tokens             tokens generated in total (all prompts, one repeat)
repeats                timed repeats after warm-up (numbers are medians over them)
ttft_ms                time to first token (prefill), ms
itl_ms                 mean inter-token latency after the first token, ms
decode_tok_s           new tokens / decode time (after the first token)
e2e_tok_s              new tokens / whole generate() time
speedup_vs_hf          e2e_tok_s / e2e_tok_s of "hf" on the same settings
speedup_vs_assisted    e2e_tok_s / e2e_tok_s of "hf-assisted" on the same settings
spec_over_plain        decode_tok_s / decode_tok_s of "ours-plain" on the same path (eager / graphs)
acceptance_rate        a: accepted draft tokens / proposed draft tokens
tokens_per_step        mean tokens emitted per target forward pass
k                      draft length: int, or "auto" for the adaptive controller
k_mean                 mean draft length actually used (what "auto" settled on)
draft_s                time in the drafter, s (all prompts)
verify_s               time in target verify forwards, s (all prompts)
draft_cost_ratio       c: time of one draft step / time of one target step
theoretical_speedup    (1 - a^(k+1)) / ((1 - a)(c*k + 1))  (Leviathan et al. 2023)
efficiency             speedup_vs_hf / theoretical_speedup
identical_to_hf        greedy tokens equal hf's: True / False / None (not checked)
agreement              fraction of generated tokens equal to hf's (position by position)
identical_prefix_len   mean length of the prefix identical to hf's output, tokens
peak_mem_bytes         peak device memory (torch.cuda.max_memory_allocated or RSS on CPU)
kv_bytes               KV-cache bytes at the end of generation
cached_prompt_tokens   prompt tokens served by the prefix cache (not prefilled)
roofline_fraction      decode tok/s over (copy bandwidth / bytes read per step), GPU only
error                  None, or why the row failed (exception text, "tokens differ from hf")
=====================  =======================================================================

A row *fails* (shows FAIL in tables, hatched in plots) when ``error`` is set, or when it is
greedy, fp32 and ``identical_to_hf`` is False: in fp32 greedy speculation must be lossless.
In bf16/fp16 a (k+1)-token verify pass rounds differently from one-token steps, so there
``agreement`` is reported instead (see BENCHMARKS.md).

A result file (:func:`write_json`) is ``{"schema": 1, "environment": environment(),
"workload": {...}, "config": {...}, "rows": [row, ...]}``; only "rows" is required by
the functions here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
from pathlib import Path

SCHEMA_VERSION = 1

ROW_FIELDS: dict[str, str] = {
    "workload": "workload name",
    "variant": "what ran (hf, hf-assisted(D), hf-lookup, ours-...)",
    "draft": "label of the draft model used",
    "compile": "our compile=True path (+graphs)",
    "device": "device name",
    "dtype": "float32 | bfloat16 | float16",
    "batch_size": "rows decoded together",
    "n_prompts": "prompts measured",
    "max_new_tokens": "generation budget per prompt",
    "do_sample": "sampling (True) or greedy (False)",
    "prompt_tokens": "mean prompt length, tokens",
    "new_tokens": "tokens generated in total",
    "repeats": "timed repeats after warm-up",
    "ttft_ms": "time to first token, ms",
    "itl_ms": "mean inter-token latency, ms",
    "decode_tok_s": "decode tokens/s",
    "e2e_tok_s": "end-to-end tokens/s",
    "speedup_vs_hf": "e2e speedup over hf",
    "speedup_vs_assisted": "e2e speedup over hf-assisted",
    "spec_over_plain": "decode speedup over ours-plain on the same path",
    "prompt_seconds": "end-to-end seconds of each prompt (or batch), in workload order",
    "worst_prompt_vs_assisted": "min over prompts of hf-assisted's seconds / this row's (same draft)",
    "acceptance_rate": "accepted / proposed draft tokens",
    "tokens_per_step": "tokens per target forward",
    "k": "draft length (int or 'auto')",
    "k_mean": "mean draft length used",
    "draft_s": "time in the drafter, s",
    "verify_s": "time in verify forwards, s",
    "draft_cost_ratio": "draft step time / target step time",
    "theoretical_speedup": "(1-a^(k+1)) / ((1-a)(ck+1))",
    "efficiency": "realized / theoretical speedup",
    "identical_to_hf": "greedy tokens equal hf's",
    "agreement": "fraction of tokens equal to hf's",
    "identical_prefix_len": "mean identical prefix length, tokens",
    "peak_mem_bytes": "peak device memory, bytes",
    "kv_bytes": "KV-cache bytes",
    "cached_prompt_tokens": "prompt tokens served by the prefix cache",
    "roofline_fraction": "decode tok/s over the bandwidth roofline",
    "error": "None or why the row failed",
}

_BASELINE = "hf"
_ASSISTED = "hf-assisted"
# rows compared with each other for speedups share these settings
_GROUP_KEYS = ("workload", "device", "dtype", "batch_size", "n_prompts", "max_new_tokens", "do_sample")


def new_row(**fields) -> dict:
    """A row with every schema key (``None`` where not given). Unknown keys raise ``KeyError``."""
    unknown = sorted(set(fields) - set(ROW_FIELDS))
    if unknown:
        raise KeyError(f"unknown row field(s) {unknown}; see benchmarks.report.ROW_FIELDS")
    return {key: fields.get(key) for key in ROW_FIELDS}


# --------------------------------------------------------------------------------------
# Speculative decoding arithmetic


def theoretical_speedup(a: float, k: float, c: float) -> float:
    """Expected speedup of speculative decoding: (1 - a^(k+1)) / ((1 - a)(c*k + 1)).

    ``a``: acceptance rate in [0, 1]; ``k``: draft length >= 0; ``c``: cost of one draft step
    over one target step, >= 0. The a -> 1 limit is (k + 1) / (c*k + 1); k = 0 gives 1.
    """
    a, k, c = float(a), float(k), float(c)
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")
    if k < 0 or c < 0 or math.isnan(k) or math.isnan(c):
        raise ValueError(f"k and c must be >= 0, got k={k}, c={c}")
    if a == 0.0:
        expected_tokens = 1.0
    elif a == 1.0:
        expected_tokens = k + 1.0
    else:  # 1 + a + ... + a^k, stable near a = 1
        la = math.log1p(a - 1.0)
        expected_tokens = math.expm1((k + 1.0) * la) / math.expm1(la)
    return expected_tokens / (c * k + 1.0)


def efficiency(realized: float | None, a: float | None, k, c: float | None) -> float | None:
    """Realized speedup over :func:`theoretical_speedup`; ``None`` if an input is missing."""
    if realized is None or a is None or c is None or not isinstance(k, (int, float)) or isinstance(k, bool):
        return None
    try:
        return float(realized) / theoretical_speedup(a, k, c)
    except (ValueError, ZeroDivisionError):
        return None


def row_failure(row: dict) -> str | None:
    """Why the row counts as failed, or ``None`` when it does not."""
    if row.get("error"):
        return str(row["error"])
    dtype = str(row.get("dtype") or "").replace("torch.", "")
    if row.get("identical_to_hf") is False and not row.get("do_sample") and dtype in ("float32", "fp32"):
        return "tokens differ from hf"
    return None


def _is_baseline(variant) -> bool:
    return variant in (_BASELINE, _ASSISTED) or str(variant).startswith(_ASSISTED + "(")


def derive(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with speedups, theoretical speedup and efficiency filled in.

    Speedups compare e2e tokens/s (decode tokens/s when e2e is missing) with the "hf" and
    "hf-assisted" rows of the same settings (``_GROUP_KEYS``). Values already set are kept.
    """
    out = [dict(r) for r in rows]

    def rate(r):
        return r.get("e2e_tok_s") if r.get("e2e_tok_s") is not None else r.get("decode_tok_s")

    baselines: dict[tuple, dict] = {}
    for r in out:
        if _is_baseline(r.get("variant")) and not row_failure(r) and rate(r):
            baselines.setdefault((r["variant"],) + tuple(r.get(k) for k in _GROUP_KEYS), r)
    for r in out:
        group = tuple(r.get(k) for k in _GROUP_KEYS)
        for field, base in (("speedup_vs_hf", _BASELINE), ("speedup_vs_assisted", _ASSISTED)):
            ref = baselines.get((base,) + group)
            if base == _ASSISTED and r.get("draft"):  # HF assisted generation with the same draft
                ref = baselines.get((f"{_ASSISTED}({r['draft']})",) + group)
            if r.get(field) is None and ref is not None and rate(r) is not None:
                r[field] = rate(r) / rate(ref)
        k = r.get("k_mean") if r.get("k") == "auto" or r.get("k_mean") is not None else r.get("k")
        a, c = r.get("acceptance_rate"), r.get("draft_cost_ratio")
        if r.get("theoretical_speedup") is None and a is not None and c is not None and isinstance(k, (int, float)):
            try:
                r["theoretical_speedup"] = theoretical_speedup(a, k, c)
            except ValueError:
                pass
        if r.get("efficiency") is None:
            r["efficiency"] = efficiency(r.get("speedup_vs_hf"), a, k, c)
    return out


# --------------------------------------------------------------------------------------
# Markdown


def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _bytes(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return "-"


def _k(row) -> str:
    k = row.get("k")
    if k is None:
        return "-"
    if k == "auto" and row.get("k_mean") is not None:
        return f"auto ({row['k_mean']:.1f})"
    return str(k)


def _identical(row) -> str:
    if row.get("do_sample"):
        return "sampled"
    ident, agree, prefix = row.get("identical_to_hf"), row.get("agreement"), row.get("identical_prefix_len")
    if ident is True:
        return "yes"
    parts = []
    if ident is False:
        parts.append("no")
    if agree is not None:
        parts.append(f"{agree:.1%}")
    if prefix is not None:
        parts.append(f"prefix {prefix:.0f}")
    return ", ".join(parts) if parts else "-"


def _speed(key):
    def f(row):
        if row_failure(row):
            return "FAIL"
        return "-" if row.get(key) is None else f"{row[key]:.2f}x"
    return f


def _status(row) -> str:
    why = row_failure(row)
    return f"FAIL: {why}" if why else "ok"


# column key -> (header, cell formatter, always shown)
COLUMNS: dict[str, tuple] = {
    "workload": ("workload", lambda r: str(r.get("workload") or "-"), False),
    "variant": ("variant", lambda r: str(r.get("variant") or "-"), True),
    "e2e_tok_s": ("tokens/s", lambda r: _num(r.get("e2e_tok_s"), ".1f"), False),
    "decode_tok_s": ("decode tok/s", lambda r: _num(r.get("decode_tok_s"), ".1f"), False),
    "speedup_vs_hf": ("vs hf", _speed("speedup_vs_hf"), False),
    "speedup_vs_assisted": ("vs hf-assisted", _speed("speedup_vs_assisted"), False),
    "spec_over_plain": ("vs our plain", _speed("spec_over_plain"), False),
    "ttft_ms": ("TTFT ms", lambda r: _num(r.get("ttft_ms"), ".1f"), False),
    "itl_ms": ("ITL ms", lambda r: _num(r.get("itl_ms"), ".2f"), False),
    "acceptance_rate": ("acceptance", lambda r: _num(r.get("acceptance_rate"), ".1%"), False),
    "tokens_per_step": ("tokens/step", lambda r: _num(r.get("tokens_per_step"), ".2f"), False),
    "k": ("k", _k, False),
    "identical": ("identical to hf", _identical, False),
    "peak_mem_bytes": ("peak mem", lambda r: _bytes(r.get("peak_mem_bytes")), False),
    "kv_bytes": ("KV bytes", lambda r: _bytes(r.get("kv_bytes")), False),
    "efficiency": ("efficiency", lambda r: "-" if row_failure(r) else _num(r.get("efficiency"), ".0%"), False),
    "theoretical_speedup": ("theory", lambda r: _num(r.get("theoretical_speedup"), ".2f"), False),
    "draft_cost_ratio": ("c", lambda r: _num(r.get("draft_cost_ratio"), ".3f"), False),
    "prompt_tokens": ("prompt tok", lambda r: _num(r.get("prompt_tokens"), ".0f"), False),
    "cached_prompt_tokens": ("cached tok", lambda r: _num(r.get("cached_prompt_tokens"), ".0f"), False),
    "roofline_fraction": ("roofline", lambda r: _num(r.get("roofline_fraction"), ".1%"), False),
    "status": ("status", _status, True),
}

DEFAULT_COLUMNS = ("workload", "variant", "e2e_tok_s", "speedup_vs_hf", "speedup_vs_assisted", "ttft_ms", "itl_ms",
                   "acceptance_rate", "tokens_per_step", "k", "identical", "peak_mem_bytes", "efficiency", "status")


# `specdec bench`'s table: what a reader needs first (the JSON holds every field)
BENCH_COLUMNS = ("variant", "decode_tok_s", "speedup_vs_hf", "spec_over_plain", "acceptance_rate", "tokens_per_step",
                 "identical", "ttft_ms")

BENCH_LEGEND = """\
columns: decode tok/s = new tokens per second after the first one (all rows of a batch) |
  vs hf = over HF generate() | vs our plain = over ours-plain on the same path (eager, or +graphs):
  what speculation alone adds | acceptance = accepted / proposed draft tokens |
  tokens/step = tokens per target forward | identical to hf = greedy tokens equal HF's (else: share
  of equal tokens, identical prefix length; "sampled": speed only) | TTFT ms = median time to first token.
rows: (D) = the draft model used | +graphs = compile=True (static cache + CUDA graphs) |
  FAIL = an error, or greedy fp32 tokens that differ from hf."""


def bench_table(rows: list[dict]) -> str:
    """The ``specdec bench`` table (``BENCH_COLUMNS``)."""
    return markdown_table(rows, list(BENCH_COLUMNS))


def verdict(rows: list[dict]) -> str:
    """One line: the fastest row against hf and our plain row, then whether the outputs held.

    e.g. ``fastest: ours-lookup 2.10x hf, 1.30x our plain; all greedy outputs identical to hf``.
    """
    ok = [r for r in rows if not row_failure(r) and r.get("decode_tok_s")]
    if not ok:
        return "verdict: no row finished (see the errors in the JSON)"
    best = max(ok, key=lambda r: r["decode_tok_s"])
    speed = [f"{best['speedup_vs_hf']:.2f}x hf"] if best.get("speedup_vs_hf") is not None else []
    speed += [f"{best['spec_over_plain']:.2f}x our plain"] if best.get("spec_over_plain") is not None else []
    if best.get("variant") == _BASELINE:
        speed = ["(no row beat HF generate())"]
    head = f"fastest: {best['variant']}" + (f" {', '.join(speed)}" if speed else "")
    return f"{head}; {_outputs_verdict(rows)}"


def _outputs_verdict(rows: list[dict]) -> str:
    failed = [r["variant"] for r in rows if row_failure(r)]
    if failed:
        return "FAILED: " + ", ".join(failed)
    if any(r.get("do_sample") for r in rows):
        return "sampled: speed only, no identity check"
    checked = [r for r in rows if r.get("identical_to_hf") is not None]
    if checked and all(r["identical_to_hf"] for r in checked):
        return "all greedy outputs identical to hf"
    agree = [r["agreement"] for r in checked if r.get("agreement") is not None]
    if agree:
        return f"greedy agreement with hf >= {min(agree):.1%} (bf16/fp16 rounding; identity is checked in fp32)"
    return "outputs not compared"


def _measured(rows, key) -> bool:
    if key == "identical":
        return any(r.get(f) is not None for r in rows for f in ("identical_to_hf", "agreement", "identical_prefix_len"))
    if key == "workload":
        return len({r.get("workload") for r in rows}) > 1
    return any(r.get(key) is not None for r in rows)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``.

    ``columns``: keys of ``COLUMNS`` (or any row key, shown raw). By default the columns of
    ``DEFAULT_COLUMNS`` that some row measured (workload only when rows mix workloads).
    Failed rows (:func:`row_failure`) say FAIL in the speedup and status columns.
    """
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if COLUMNS[c][2] or _measured(rows, c)]
    headers, cells = [], []
    for c in columns:
        if c in COLUMNS:
            headers.append(COLUMNS[c][0])
            cells.append(COLUMNS[c][1])
        else:
            headers.append(c)
            cells.append(lambda r, c=c: "-" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float)
                                                                      else str(r[c])))
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(f(r)) for f in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# JSON


def _jsonable(x):
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        return [_jsonable(v) for v in items]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, (Path, _dt.date)):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:  # numpy / torch scalars
        return _jsonable(x.item())
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return str(x)  # torch.dtype, torch.device, ...


def write_json(result: dict, path) -> Path:
    """Write ``result`` as indented JSON (atomically; parents created); returns the path.

    Non-JSON values are converted: NaN/inf -> null, dtypes/devices/paths -> str, tensors and
    numpy values -> numbers/lists, dataclasses -> dicts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def result_path(root, env: dict, workload: str, model: str = "model", settings: tuple[str, ...] = ()) -> Path:
    """``root/<workload>-<model>-<device slug>[-<settings>...]-<date>.json``: what the file measures.

    ``settings``: extra tags that change what is measured (e.g. ``("bs4", "sampled")``)."""
    parts = [workload, model, device_slug(env), *settings]
    stem = "-".join(_file_slug(p) for p in parts)
    return Path(root) / f"{stem}-{env.get('date', _dt.date.today().isoformat())}.json"


def _file_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")[:40] or "-"


# --------------------------------------------------------------------------------------
# Environment


def environment() -> dict:
    """What the numbers were measured on: :func:`specdec.environment.environment` (imported here
    on first use, so reading and tabulating results needs no torch)."""
    from specdec.environment import environment as measured_on

    return measured_on()


def device_slug(env: dict) -> str:
    """Short file-name-safe device tag: 'h100', 'a100', 'cpu' (any CPU)."""
    name = str(env.get("device") or "cpu")
    if name == env.get("cpu") or "cuda" not in name.lower() and not re.search(r"nvidia|tesla|geforce|rtx|amd instinct|radeon", name, re.I):
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


# --------------------------------------------------------------------------------------
# Plots (matplotlib imported inside, Agg backend)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_K_SUFFIX = re.compile(r"[\s_-]*\(?k\s*=?\s*(\d+|auto)\)?$", re.I)


def _series(row) -> str:
    name = _K_SUFFIX.sub("", str(row.get("variant") or "?"))
    return f"{name} [{row['workload']}]" if row.get("workload") else name


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_speedup_vs_k(rows: list[dict], path) -> Path:
    """Speedup over hf against draft length k: one line per variant (k stripped from its
    name) and workload, the theoretical curve (mean a and c of the series) dashed, hf = 1 and
    hf-assisted as horizontal references. "auto" rows are drawn at their mean k with a star;
    failed rows as red crosses."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("speedup_vs_hf") is None or r.get("k") is None:
            continue
        series.setdefault(_series(r), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_k = 1
    for i, (name, rs) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        fixed = sorted((r for r in rs if isinstance(r["k"], (int, float)) and not row_failure(r)), key=lambda r: r["k"])
        if fixed:
            ax.plot([r["k"] for r in fixed], [r["speedup_vs_hf"] for r in fixed], "o-", color=color, label=name)
            max_k = max(max_k, max(r["k"] for r in fixed))
            a = [r["acceptance_rate"] for r in fixed if r.get("acceptance_rate") is not None]
            c = [r["draft_cost_ratio"] for r in fixed if r.get("draft_cost_ratio") is not None]
            if a and c:
                ks = list(range(0, int(max(r["k"] for r in fixed)) + 1))
                am, cm = sum(a) / len(a), sum(c) / len(c)
                ax.plot(ks, [theoretical_speedup(am, k, cm) for k in ks], "--", color=color, alpha=0.6,
                        label=f"theory a={am:.2f} c={cm:.2f}")
        for r in rs:
            if r["k"] == "auto" and not row_failure(r):
                x = r.get("k_mean") if r.get("k_mean") is not None else max_k + 1
                ax.plot([x], [r["speedup_vs_hf"]], "*", ms=14, color=color,
                        label=f"{name} k=auto" + (f" ({x:.1f})" if r.get("k_mean") is not None else ""))
                max_k = max(max_k, x)
            elif row_failure(r):
                x = r["k"] if isinstance(r["k"], (int, float)) else max_k + 1
                ax.plot([x], [r["speedup_vs_hf"] or 0], "x", ms=10, mew=2, color="red")
    ax.axhline(1.0, color="black", lw=1, label="hf generate() = 1.0")
    assisted = [r["speedup_vs_hf"] for r in rows if r.get("variant") == _ASSISTED and r.get("speedup_vs_hf")]
    if assisted:
        ax.axhline(sum(assisted) / len(assisted), color="gray", ls=":", lw=1.5, label="hf-assisted")
    if any(row_failure(r) for r in rows if r.get("speedup_vs_hf") is not None):
        ax.plot([], [], "x", color="red", mew=2, label="FAIL (not lossless / error)")
    _frame(ax, rows, "draft length k (tokens proposed per step)", "speedup vs hf generate() (x)",
           "Speculative decoding: speedup vs draft length")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _frame(ax, rows, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, both axes from 0, a light grid, and the title with device and dtype."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, rows, title)


def _title(ax, rows, what: str):
    dev = sorted({str(r["device"]) for r in rows if r.get("device")})
    dt = sorted({str(r["dtype"]) for r in rows if r.get("dtype")})
    sub = ", ".join(x for x in (" / ".join(dev), " / ".join(dt)) if x)
    ax.set_title(what + (f"\n{sub}" if sub else ""), fontsize=10)


def plot_ttft_vs_prefix(rows: list[dict], path) -> Path:
    """Time to first token against prompt length (``prompt_tokens``), one line per variant
    and workload: shows prefill cost growing with the prompt, and the prefix cache cutting it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("ttft_ms") is not None and r.get("prompt_tokens") is not None:
            series.setdefault(_series(r), []).append(r)
    for name, rs in sorted(series.items()):
        good = sorted((r for r in rs if not row_failure(r)), key=lambda r: r["prompt_tokens"])
        if good:
            ax.plot([r["prompt_tokens"] for r in good], [r["ttft_ms"] for r in good], "o-", label=name)
        bad = [r for r in rs if row_failure(r)]
        if bad:
            ax.plot([r["prompt_tokens"] for r in bad], [r["ttft_ms"] for r in bad], "x", color="red", ms=10, mew=2,
                    label=f"{name} FAIL")
    _frame(ax, rows, "prompt length (tokens)", "time to first token (ms)",
           "Prefill: time to first token vs prompt length")
    if series:
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_tokens_per_s(rows: list[dict], path) -> Path:
    """Horizontal bars of end-to-end tokens/s (decode tok/s if missing) per variant, grouped
    by workload, each labelled with its speedup over hf; failed rows hatched and marked FAIL."""
    plt = _pyplot()
    rows = [r for r in rows if (r.get("e2e_tok_s") if r.get("e2e_tok_s") is not None else r.get("decode_tok_s"))
            is not None or row_failure(r)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(rows), 2) + 1.4))
    workloads = list(dict.fromkeys(r.get("workload") or "-" for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels, y = [], 0
    yticks = []
    vmax = max([(r.get("e2e_tok_s") or r.get("decode_tok_s") or 0) for r in rows] + [1e-9])
    for wi, wl in enumerate(workloads):
        for r in [r for r in rows if (r.get("workload") or "-") == wl]:
            v = r.get("e2e_tok_s") if r.get("e2e_tok_s") is not None else (r.get("decode_tok_s") or 0)
            fail = row_failure(r)
            ax.barh(y, v, color="lightgray" if fail else colors[wi % len(colors)], hatch="//" if fail else None,
                    edgecolor="red" if fail else "none")
            note = "FAIL" if fail else (f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") is not None else "")
            label = note if fail and not v else f"{v:.1f}  {note}".rstrip()
            ax.text(v + vmax * 0.01, y, label, va="center", fontsize=8,
                    color="red" if fail else "black")
            labels.append(f"{r.get('variant')}" + (f" [{wl}]" if len(workloads) > 1 else ""))
            yticks.append(y)
            y += 1
        y += 0.6
    ax.set_yticks(yticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, vmax * 1.25)
    ax.set_xlabel("end-to-end tokens/s (label: speedup vs hf)")
    ax.grid(axis="x", alpha=0.3)
    _title(ax, rows, "Throughput per variant")
    return _save(fig, path)
