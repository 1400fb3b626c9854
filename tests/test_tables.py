"""benchmarks.tables: markdown tables generated from results JSON, never typed by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import tables


def _row(variant: str, tok_s: float, **extra) -> dict:
    return dict(workload="code", variant=variant, dtype="bfloat16", batch_size=1, n_prompts=2, max_new_tokens=128,
                decode_tok_s=tok_s, agreement=1.0, error=None, **extra)


@pytest.fixture
def bench_file(tmp_path, monkeypatch):
    """A small bench JSON under a fake repository root."""
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    data = dict(environment=dict(device="GPU-X", torch="2.0", transformers="5.0"), model="tiny", draft="self:2",
                rows=[_row("hf", 10.0), _row("hf-assisted", 5.0), _row("ours-plain", 20.0, tokens_per_step=1.0),
                      _row("ours-draft+graphs", 45.0, tokens_per_step=3.0, acceptance_rate=0.5),
                      dict(_row("hf-lookup", 0.0), error="ValueError: no")])
    path = tmp_path / "benchmarks/results/x.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return "benchmarks/results/x.json"


def test_bench_table_from_a_fixture(bench_file):
    table = tables.bench_table({"code": bench_file}, ["hf", "hf-lookup", "ours-plain", "ours-draft+graphs"], "docs")
    assert table == (
        "| variant | code |\n"
        "| --- | --- |\n"
        "| `hf` (`model.generate`) | 10.0 (1.00x) |\n"
        "| ours, plain decoding, eager | 20.0 (2.00x) |\n"
        "| ours, draft `self:2`, `compile=True` | 45.0 (4.50x) |\n"
        "\n"
        "Decode tokens/s (speedup over `hf`). GPU-X, torch 2.0, transformers 5.0; tiny, bfloat16, batch 1, greedy, "
        "2 prompts x 128 new tokens; files: [code](../benchmarks/results/x.json).")


def test_detail_table_computes_ratios_from_the_rows(bench_file):
    table = tables.bench_detail_table({"code": bench_file}, "")
    assert "| code | ours, draft `self:2`, `compile=True` | 45.0 | 4.50x | 9.00x | 3.00 | 0.50 | 1.00 |" in table
    assert "hf-lookup" not in table  # a row that failed is not a number
    assert "[code](benchmarks/results/x.json)" in table


def test_render_fills_only_between_markers():
    text = "intro\n<!-- table:t -->\nold, typed by hand\n<!-- /table -->\noutro\n"
    out = tables.render(text, "", {"t": lambda base: "| a |\n| --- |"})
    assert out == "intro\n<!-- table:t -->\n| a |\n| --- |\n<!-- /table -->\noutro\n"
    assert tables.render(out, "", {"t": lambda base: "| a |\n| --- |"}) == out  # idempotent


def test_render_refuses_unknown_or_unclosed_markers():
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.render("<!-- table:nope -->\n<!-- /table -->", "", {})
    with pytest.raises(ValueError, match="no '<!-- /table -->'"):
        tables.render("<!-- table:t -->\nrest", "", {"t": lambda base: ""})


def test_every_table_renders_from_the_committed_json():
    for name, make in tables.TABLES.items():
        assert make("").startswith("| "), name


def test_committed_tables_equal_the_generated_ones():
    """README.md and docs/ hold exactly what `python -m benchmarks.tables` writes from the committed JSON."""
    readme = (tables.ROOT / "README.md").read_text()
    assert "<!-- table:speedup -->" in readme
    assert tables.update(check=True) == [], "run `python -m benchmarks.tables` and commit the result"
