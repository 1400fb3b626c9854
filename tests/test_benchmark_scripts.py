"""Every benchmark script imports on a CPU machine and its --help explains it (GPU-only ones too)."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = ["batch_bench", "draft_acceptance", "gen_throughput", "multi_gpu", "prefix_bench", "prefix_draft_bench",
           "prefix_insert_ab", "quant_quality", "quant_speed", "roofline", "run", "step_kernels", "step_profile"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out
