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
