"""The quantization benchmarks' logic, on CPU (the real runs are GPU / slow)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import quant_quality, quant_speed


def test_windows_cover_every_token_once():
    for n, window, stride in [(2048, 1024, 1024), (2048, 1024, 512), (1000, 300, 128), (10, 64, 32)]:
        scored = []
        for begin, end, first in quant_quality.windows(n, window, stride):
            assert end - begin <= window
            scored += range(begin + max(first, 0) + 1, end)
        assert scored == list(range(1, n))


def test_text_is_offline_and_long():
    assert len(quant_quality.load_text()) > 20000


def test_speed_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(SystemExit, match="CUDA"):
        quant_speed.main(["--out", str(tmp_path)])


def test_speed_tiny_cpu_smoke(tmp_path):
    report = quant_speed.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "quant-speed-cpu-tiny.json").read_text())
    assert written["decode"]["tiny"].keys() == {"bf16", "int8", "int4"}
    for row in report["decode"]["tiny"].values():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and 0 < row["roofline_fraction"]
    rows = report["decode"]["tiny"]
    assert rows["int8"]["weight_bytes_per_step"] < rows["bf16"]["weight_bytes_per_step"]
    assert rows["int4"]["weight_bytes_per_step"] < rows["int8"]["weight_bytes_per_step"]
    kv = report["kv_cache_bytes"]["tiny"]
    assert kv["int4"] < kv["int8"] < kv["bf16"]
    assert all("error" not in r for r in report["kv_decode"]["tiny"].values())


def test_speed_records_a_failing_variant(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel missing")

    monkeypatch.setattr(quant_speed, "decode_speed", boom)
    report = quant_speed.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--variants", "bf16", "int8"])
    assert "kernel missing" in report["decode"]["tiny"]["int8"]["error"]
    assert "bf16" in report["decode"]["tiny"]


def test_graphs_tiny_cpu_end_to_end(tmp_path):
    from benchmarks import quant_graphs

    result = quant_graphs.main(["--shape", "tiny", "--device", "cpu", "--paths", "graphs", "eager", "--new-tokens", "8",
                                "--repeats", "1", "--warmup-tokens", "2", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "quant-graphs-llama-tiny-cpu.json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"environment", "command", "copy_bandwidth_GBps", "bytes_note", "int4_over_bf16_compiled",
            "int8_over_bf16_compiled"} <= written.keys()
    rows = {(r["variant"], r["path"]): r for r in written["rows"]}
    assert set(rows) == {(v, p) for v in ("bf16", "int8", "int4") for p in ("graphs", "eager")}
    for row in rows.values():
        assert row["error"] is None, row
        assert row["tok_s"] > 0 and row["seconds"] > 0 and row["roofline_tok_s"] > 0
        assert 0 < row["roofline_fraction"] and len(row["tokens"]) == 8
        assert isinstance(row["agreement_with_bf16"], float) and 0 <= row["agreement_with_bf16"] <= 1
        assert row["graphs_captured_while_timed"] == 0
    assert rows[("bf16", "graphs")]["agreement_with_bf16"] == 1.0
    assert rows[("int4", "graphs")]["bytes_per_token"] < rows[("int8", "graphs")]["bytes_per_token"] \
        < rows[("bf16", "graphs")]["bytes_per_token"]
    assert written["int4_over_bf16_compiled"] > 0 and written["int8_over_bf16_compiled"] > 0


def test_graphs_records_failures_and_the_deadline(tmp_path, monkeypatch):
    from benchmarks import quant_graphs

    def boom(*a, **k):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(quant_graphs, "run_path", boom)
    result = quant_graphs.main(["--shape", "tiny", "--device", "cpu", "--variants", "bf16", "int4",
                                "--out", str(tmp_path)])
    assert [r["error"] for r in result["rows"]] == ["RuntimeError: capture failed"] * 2
    assert result["int4_over_bf16_compiled"] is None
    late = quant_graphs.main(["--shape", "tiny", "--device", "cpu", "--variants", "bf16", "int4",
                              "--deadline", "0", "--out", str(tmp_path)])
    assert [r["error"] for r in late["rows"]] == ["skipped: deadline"] * 2


def test_graphs_agreement():
    from benchmarks.quant_graphs import agreement

    got = agreement([1, 2, 9, 4], [1, 2, 3, 4])
    assert got == {"agreement_with_bf16": 0.75, "agreement_prefix_with_bf16": 0.5, "first_divergence": 2}
    assert agreement([1, 2], [1, 2])["agreement_prefix_with_bf16"] == 1.0
    assert agreement([1], None)["agreement_with_bf16"] is None


def test_graphs_forced_backend_variants_and_backend_field(tmp_path):
    from benchmarks import quant_graphs

    result = quant_graphs.main(["--shape", "tiny", "--device", "cpu", "--variants", "bf16", "int4:reference",
                                "--new-tokens", "4", "--repeats", "1", "--warmup-tokens", "2", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["bf16"]["backend"] == "bf16" and rows["int4:reference"]["backend"] == "reference"
    assert rows["int4:reference"]["joined_groups"] == 2 * 2            # q/k/v and gate/up in each of 2 layers
    assert result["over_bf16_compiled"]["int4:reference"] > 0 and result["int4_over_bf16_compiled"] is None


def test_kernels_tiny_cpu_smoke(tmp_path):
    from benchmarks import quant_kernels

    result = quant_kernels.main(["--device", "cpu", "--shapes", "tiny", "--rows", "1", "--sweep", "none",
                                 "--out", str(tmp_path)])
    timed = {(r["format"], r["backend"]): r for r in result["rows"] if r.get("seconds")}
    assert {("bf16", "bf16"), ("int8", "reference"), ("int4", "reference")} <= set(timed)
    assert timed["int8", "reference"]["max_rel_error"] == 0.0
    assert timed["int4", "reference"]["GBps"] > 0 and result["best"][0]["shape"] == "tiny"
