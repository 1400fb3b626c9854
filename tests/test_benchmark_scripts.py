"""Every benchmark script imports on a CPU machine and its --help explains it (GPU-only ones too)."""

from __future__ import annotations

import importlib

import pytest

SCRIPTS = ["batch_bench", "draft_acceptance", "draft_speed", "gen_throughput", "multi_gpu", "prefix_bench", "prefix_draft_bench",
           "prefix_hit_profile", "prefix_ttft", "prefix_insert_ab", "quant_graphs", "quant_kernels", "quant_quality",
           "quant_speed", "roofline", "run", "step_kernels", "step_profile"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_draft_speed_pools_runs_and_counts_decode_steps():
    from benchmarks.draft_speed import _summary

    runs = [dict(seconds=2.0, new_tokens=11, steps=5, accepted=6, proposed=8),
            dict(seconds=1.0, new_tokens=5, steps=4, accepted=0, proposed=4)]
    row = _summary({"code": runs})["workloads"]["code"]
    assert row["tokens_per_s"] == pytest.approx(16 / 3)            # all tokens over all seconds
    assert row["median_run_tokens_per_s"] == pytest.approx((5.5 + 5.0) / 2)
    assert row["tokens_per_step"] == pytest.approx((10 + 4) / 9)    # the prefill's token is no decode step's
    assert row["acceptance"] == pytest.approx(6 / 12)
    plain = _summary({"chat": [dict(seconds=1.0, new_tokens=3, steps=2, accepted=0, proposed=0)]})
    assert plain["workloads"]["chat"]["acceptance"] is None


@pytest.mark.parametrize("argv", [["--n-prompts", "0"], ["--repeats", "0"], ["--names", "a", "b"]])
def test_draft_speed_refuses_bad_arguments(argv, tmp_path, capsys):
    from benchmarks import draft_speed

    with pytest.raises(SystemExit) as exit_:
        draft_speed.main(["--drafts", "x.safetensors", "--out", str(tmp_path / "o.json"), *argv])
    assert exit_.value.code == 2
    assert "--" in capsys.readouterr().err


def test_prefix_ttft_runs_on_a_tiny_model(tmp_path):
    from benchmarks import prefix_ttft

    result = prefix_ttft.main(["--model", "tiny", "--device", "cpu", "--lengths", "32", "--modes", "eager,compile",
                               "--repeats", "1", "--check-tokens", "4", "--out", str(tmp_path)])
    assert [r["compile"] for r in result["rows"]] == [False, True]
    for row in result["rows"]:
        assert row["identical"] and row["checked_hit_tokens"] == 32
        assert row["ttft_hit_ms"] > 0 and row["min_hit_tokens"] == 0
    assert "prefix_ttft" in result["command"] and result["environment"]["torch"]
    assert list(tmp_path.glob("prefix-ttft-*-tiny.json"))
