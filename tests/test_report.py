"""benchmarks.report: schema, arithmetic, markdown, JSON and plots (no model needed)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import report
from benchmarks.report import (ROW_FIELDS, derive, efficiency, environment, markdown_table, new_row, read_json,
                               row_failure, theoretical_speedup, write_json)


def _rows():
    common = dict(workload="chat", device="cpu", dtype="float32", batch_size=1, n_prompts=4, max_new_tokens=64,
                  do_sample=False, prompt_tokens=1890.0)
    rows = [
        new_row(variant="hf", e2e_tok_s=10.0, decode_tok_s=11.0, ttft_ms=120.0, itl_ms=90.9, identical_to_hf=True,
                peak_mem_bytes=600 << 20, **common),
        new_row(variant="hf-assisted", e2e_tok_s=4.0, ttft_ms=130.0, itl_ms=240.0, k=5, identical_to_hf=True,
                **common),
        new_row(variant="hf-lookup", e2e_tok_s=12.0, ttft_ms=118.0, identical_to_hf=True, **common),
    ]
    for k, tps, a in ((2, 13.0, 0.7), (4, 15.0, 0.68), (8, 12.5, 0.66)):
        rows.append(new_row(variant=f"ours-lookup k={k}", k=k, e2e_tok_s=tps, acceptance_rate=a,
                            draft_cost_ratio=0.05, tokens_per_step=2.1, identical_to_hf=True, ttft_ms=119.0,
                            kv_bytes=40 << 20, **common))
    rows.append(new_row(variant="ours-lookup", k="auto", k_mean=3.4, e2e_tok_s=14.5, acceptance_rate=0.7,
                        draft_cost_ratio=0.05, identical_to_hf=True, **common))
    rows.append(new_row(variant="ours-draft k=4", k=4, e2e_tok_s=20.0, acceptance_rate=0.5, draft_cost_ratio=0.3,
                        identical_to_hf=False, agreement=0.8, identical_prefix_len=31, **common))  # not lossless
    rows.append(new_row(variant="ours-quant", error="RuntimeError: boom | bad", **common))
    return rows


def test_new_row_has_every_field_and_rejects_typos():
    row = new_row(workload="code", variant="hf")
    assert list(row) == list(ROW_FIELDS)
    assert row["ttft_ms"] is None
    with pytest.raises(KeyError):
        new_row(workload="code", ttft=3.0)
    for key in ("workload", "variant", "device", "dtype", "batch_size", "n_prompts", "max_new_tokens", "ttft_ms",
                "itl_ms", "decode_tok_s", "e2e_tok_s", "speedup_vs_hf", "speedup_vs_assisted", "acceptance_rate",
                "tokens_per_step", "k", "draft_cost_ratio", "theoretical_speedup", "efficiency", "identical_to_hf",
                "agreement", "identical_prefix_len", "peak_mem_bytes", "kv_bytes", "error"):
        assert key in ROW_FIELDS
        assert key in report.__doc__


@pytest.mark.parametrize("k", [0, 1, 4, 10])
@pytest.mark.parametrize("c", [0.0, 0.1, 1.0])
def test_theoretical_speedup_edges(k, c):
    assert theoretical_speedup(0.0, k, c) == pytest.approx(1 / (c * k + 1))  # a = 0: nothing accepted
    assert theoretical_speedup(1.0, k, c) == pytest.approx((k + 1) / (c * k + 1))  # a = 1 limit
    assert theoretical_speedup(0.5, 0, c) == pytest.approx(1.0)  # k = 0: plain decoding
    near = theoretical_speedup(1 - 1e-12, k, c)
    assert near == pytest.approx((k + 1) / (c * k + 1), rel=1e-9)
    a = 0.7
    assert theoretical_speedup(a, k, c) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (c * k + 1)))


def test_theoretical_speedup_rejects_nonsense():
    for args in ((-0.1, 2, 0.1), (1.1, 2, 0.1), (0.5, -1, 0.1), (0.5, 2, -0.1), (math.nan, 2, 0.1)):
        with pytest.raises(ValueError):
            theoretical_speedup(*args)


def test_efficiency():
    t = theoretical_speedup(0.8, 4, 0.1)
    assert efficiency(t, 0.8, 4, 0.1) == pytest.approx(1.0)
    assert efficiency(t / 2, 0.8, 4, 0.1) == pytest.approx(0.5)
    assert efficiency(None, 0.8, 4, 0.1) is None
    assert efficiency(1.5, None, 4, 0.1) is None
    assert efficiency(1.5, 0.8, "auto", 0.1) is None


def test_row_failure_rules():
    assert row_failure(new_row(error="OOM")) == "OOM"
    assert row_failure(new_row(dtype="float32", identical_to_hf=False)) == "tokens differ from hf"
    assert row_failure(new_row(dtype="torch.float32", identical_to_hf=False)) == "tokens differ from hf"
    # bf16 rounding may flip near-ties: agreement is reported, not a failure
    assert row_failure(new_row(dtype="bfloat16", identical_to_hf=False, agreement=0.9)) is None
    assert row_failure(new_row(dtype="float32", identical_to_hf=False, do_sample=True)) is None
    assert row_failure(new_row(dtype="float32", identical_to_hf=True)) is None


def test_derive_fills_speedups_and_efficiency():
    rows = _rows()
    out = derive(rows)
    assert rows[0]["speedup_vs_hf"] is None  # pure: inputs untouched
    by = {r["variant"]: r for r in out}
    assert by["hf"]["speedup_vs_hf"] == pytest.approx(1.0)
    assert by["ours-lookup k=4"]["speedup_vs_hf"] == pytest.approx(1.5)
    assert by["ours-lookup k=4"]["speedup_vs_assisted"] == pytest.approx(15.0 / 4.0)
    t = theoretical_speedup(0.68, 4, 0.05)
    assert by["ours-lookup k=4"]["theoretical_speedup"] == pytest.approx(t)
    assert by["ours-lookup k=4"]["efficiency"] == pytest.approx(1.5 / t)
    assert by["ours-lookup"]["theoretical_speedup"] == pytest.approx(theoretical_speedup(0.7, 3.4, 0.05))
    assert by["ours-quant"]["speedup_vs_hf"] is None  # no rate measured
    # a different setting is not compared with this hf row
    other = derive([dict(rows[0]), dict(rows[3], dtype="bfloat16")])
    assert other[1]["speedup_vs_hf"] is None


def test_markdown_table_renders_and_marks_failures():
    table = markdown_table(derive(_rows()))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(_rows())
    header = lines[0]
    for h in ("variant", "tokens/s", "vs hf", "vs hf-assisted", "TTFT ms", "ITL ms", "acceptance", "tokens/step",
              "| k |", "identical to hf", "peak mem", "efficiency", "status"):
        assert h in header
    assert "workload" not in header  # one workload only
    assert all(line.replace("\\|", "").count("|") == header.count("|") for line in lines)  # the '|' in the error is escaped
    draft = next(line for line in lines if "ours-draft" in line)
    assert "FAIL" in draft and "tokens differ from hf" in draft and "80.0%" in draft and "1.7" not in draft
    quant = next(line for line in lines if "ours-quant" in line)
    assert "FAIL: RuntimeError: boom \\| bad" in quant
    hf = next(line for line in lines if line.startswith("| hf |"))
    assert "1.00x" in hf and "10.0" in hf and "600.0 MiB" in hf and "yes" in hf and "| ok |" in hf
    assert "auto (3.4)" in table
    assert "FAIL" not in next(line for line in lines if "ours-lookup k=4" in line)


def test_markdown_table_columns_and_workload_column():
    rows = derive(_rows()) + [new_row(workload="code", variant="hf", e2e_tok_s=9.0)]
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| workload | variant |")
    custom = markdown_table(rows, columns=["variant", "kv_bytes", "repeats"])
    assert custom.splitlines()[0] == "| variant | KV bytes | repeats |"
    assert "40.0 MiB" in custom
    assert markdown_table([]).count("\n") == 2


def test_json_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    rows = derive(_rows())
    result = {"schema": report.SCHEMA_VERSION, "environment": environment(), "rows": rows,
              "config": {"dtype": torch.float32, "nan": float("nan"), "t": torch.tensor(3.5), "path": tmp_path}}
    path = write_json(result, tmp_path / "sub" / "r.json")
    back = read_json(path)
    assert back["rows"] == json.loads(json.dumps(rows))
    assert back["rows"][0] == rows[0]
    assert back["config"] == {"dtype": "torch.float32", "nan": None, "t": 3.5, "path": str(tmp_path)}
    assert "NaN" not in path.read_text()
    assert not list((tmp_path / "sub").glob(".*tmp*"))


def test_environment_is_hostname_free():
    import socket

    env = environment()
    for key in ("device", "torch", "transformers", "python", "date"):
        assert env.get(key), key
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(env)
    assert report.device_slug(env) in ("cpu",) or env["device"] != env["cpu"]
    assert report.device_slug({"device": "NVIDIA H100 80GB HBM3", "cpu": "x"}) == "h100"
    assert report.device_slug({"device": "NVIDIA H200", "cpu": "x"}) == "h200"
    assert report.device_slug({"device": "Intel Xeon", "cpu": "Intel Xeon"}) == "cpu"
    h100 = {"date": "2026-11-23", "device": "NVIDIA H100 80GB HBM3"}
    assert report.result_path("res", h100, "chat", "SmolLM2-135M").name == "chat-smollm2-135m-h100-2026-11-23.json"
    name = report.result_path("res", h100, "prose", "qwen2.5-coder-1.5b", ("bs4", "sampled")).name
    assert name == "prose-qwen2.5-coder-1.5b-h100-bs4-sampled-2026-11-23.json"


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = derive(_rows())
    _png_ok(report.plot_speedup_vs_k(rows, tmp_path / "k.png"))
    _png_ok(report.plot_tokens_per_s(rows, tmp_path / "tps.png"))
    ttft = []
    for n in (512, 1024, 2048, 4096):
        ttft.append(new_row(workload="sessions", variant="hf", prompt_tokens=n, ttft_ms=n * 0.05 + 5))
        ttft.append(new_row(workload="sessions", variant="ours-prefix-cache", prompt_tokens=n, ttft_ms=8.0))
    _png_ok(report.plot_ttft_vs_prefix(ttft, tmp_path / "ttft.png"))
    # nothing plottable still writes a (blank) figure rather than raising
    _png_ok(report.plot_speedup_vs_k([], tmp_path / "empty.png"))
