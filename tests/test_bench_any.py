"""`specdec bench` on any target and draft: tiny HF directories saved to tmp_path (no downloads)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from benchmarks import report
from benchmarks.run import main

PAIR = Path.home() / ".cache" / "specdec-pair"


def _byte_tokenizer():
    """A byte-level tokenizer (257 ids) with a chat template: real text, tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    return fast


def _save(path: Path, layers: int, seed: int, tok) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root, tok = tmp_path_factory.mktemp("pair"), _byte_tokenizer()
    return _save(root / "tiny-target", 3, 0, tok), _save(root / "tiny-draft", 1, 1, tok)


def _bench(pair, out, *extra):
    target, draft = pair
    return main(["--target", str(target), "--draft", str(draft), "--device", "cpu", "--n-prompts", "2",
                 "--max-new-tokens", "8", "--max-prompt-tokens", "48", "--out", str(out), "--quiet", "--no-plot",
                 *extra])


def test_any_target_and_draft_from_hf_dirs(pair, tmp_path, capfd, recwarn):
    result = _bench(pair, tmp_path, "--workload", "general")
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["hf", "hf-lookup", "hf-assisted(tiny-draft)", "ours-plain", "ours-lookup",
                          "ours-draft(tiny-draft)"]
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert row["identical_to_hf"] is True, name
        assert row["batch_size"] == 1 and row["new_tokens"] == 16
    assert rows["ours-draft(tiny-draft)"]["draft"] == "tiny-draft"
    assert rows["ours-draft(tiny-draft)"]["speedup_vs_assisted"] is not None
    for name in ("ours-lookup", "ours-draft(tiny-draft)"):  # every speculative row: over our plain row
        want = rows[name]["decode_tok_s"] / rows["ours-plain"]["decode_tok_s"]
        assert rows[name]["spec_over_plain"] == pytest.approx(want)
    assert rows["ours-plain"]["spec_over_plain"] is None and rows["hf"]["spec_over_plain"] is None
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"general-tiny-target-cpu-{result['environment']['date']}.json"]
    assert json.loads(files[0].read_text())["rows"][-1]["spec_over_plain"] is not None
    out, err = capfd.readouterr()
    assert "| vs our plain |" in out and "columns:" in out and "fastest: " in out
    assert "all greedy outputs identical to hf" in out and "results: " in out
    # nothing from transformers or torch leaks out of the baseline rows
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
    assert "[transformers]" not in err and "Warning" not in err and "Loading weights" not in err, err


def test_batch_of_two_skips_hf_assisted_and_lookup(pair, tmp_path):
    result = _bench(pair, tmp_path, "--workload", "prose", "--n-prompts", "3", "--batch-size", "2")
    rows = {r["variant"]: r for r in result["rows"]}
    assert "hf" in rows and not any(n.startswith(("hf-assisted", "hf-lookup")) for n in rows)
    assert any("batch 1 only" in n for n in result["notes"])
    for name, row in rows.items():
        assert row["error"] is None and row["identical_to_hf"] is True, (name, row["error"])
        assert row["batch_size"] == 2 and row["new_tokens"] == 3 * 8  # a batch of 2 and a batch of 1
    assert rows["ours-draft(tiny-draft)"]["spec_over_plain"] is not None
    assert list(tmp_path.glob("prose-tiny-target-cpu-bs2-*.json"))


def test_sampling_reports_speed_only(pair, tmp_path, capsys):
    result = _bench(pair, tmp_path, "--sample", "--temperature", "0.7", "--top-p", "0.9")
    rows = {r["variant"]: r for r in result["rows"]}
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert row["do_sample"] is True and row["identical_to_hf"] is None and row["decode_tok_s"] > 0
    assert result["temperature"] == 0.7 and result["top_p"] == 0.9
    out = capsys.readouterr().out
    assert "sampled: speed only" in out and "| sampled |" in out
    assert list(tmp_path.glob("code-tiny-target-cpu-sampled-*.json"))


def test_bad_arguments_say_what_to_do(pair, tmp_path):
    with pytest.raises(ValueError, match="--quick and --full"):
        _bench(pair, tmp_path, "--quick", "--full")
    with pytest.raises(ValueError, match="temperature"):
        _bench(pair, tmp_path, "--sample", "--temperature", "0")
    with pytest.raises(SystemExit):
        _bench(pair, tmp_path, "--batch-size", "0")


def test_verdict_and_legend():
    common = dict(workload="code", device="cpu", dtype="float32", batch_size=1, do_sample=False)
    rows = [report.new_row(variant="hf", decode_tok_s=10.0, speedup_vs_hf=1.0, identical_to_hf=True, **common),
            report.new_row(variant="ours-plain", decode_tok_s=16.0, speedup_vs_hf=1.6, identical_to_hf=True, **common),
            report.new_row(variant="ours-lookup", decode_tok_s=21.0, speedup_vs_hf=2.1, spec_over_plain=1.3125,
                           identical_to_hf=True, **common)]
    assert report.verdict(rows) == "fastest: ours-lookup 2.10x hf, 1.31x our plain; all greedy outputs identical to hf"
    assert report.verdict(rows[:1]).startswith("fastest: hf (no row beat HF generate()); all greedy")
    rows.append(report.new_row(variant="ours-draft(x)", decode_tok_s=30.0, identical_to_hf=False, **common))
    assert report.verdict(rows).endswith("FAILED: ours-draft(x)")
    table = report.bench_table(rows)
    assert table.splitlines()[0].count("|") - 1 == len(report.BENCH_COLUMNS) <= 8
    for word in ("vs our plain", "acceptance", "tokens/step", "TTFT"):
        assert word in table and word in report.BENCH_LEGEND


@pytest.mark.slow
@pytest.mark.pair
def test_bench_on_the_real_pair(tmp_path):
    """Qwen2.5-Coder-1.5B with its 0.5B sibling as the draft, when ~/.cache/specdec-pair has them (no download)."""
    target, draft = (next(iter(sorted(PAIR.glob(f"qwen2.5-coder-{size}-instruct*/config.json"))), None)
                     for size in ("1.5b", "0.5b"))
    if target is None or draft is None:
        pytest.skip(f"the real pair is not in {PAIR} (python shared/models/qwen_coder_pair.py --hf)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = main(["--target", str(target.parent), "--draft", str(draft.parent), "--device", "cpu",
                       "--workload", "prose", "--n-prompts", "1", "--max-new-tokens", "16", "--out", str(tmp_path),
                       "--quiet", "--no-plot"])
    assert not caught, [str(w.message) for w in caught]  # no warning leaks from any row
    rows = {r["variant"]: r for r in result["rows"]}
    label = draft.parent.name
    assert {"hf", f"hf-assisted({label})", "ours-plain", f"ours-draft({label})"} <= set(rows)
    for name, row in rows.items():
        assert row["error"] is None and row["identical_to_hf"] is True, (name, row["error"])
    assert rows[f"ours-draft({label})"]["acceptance_rate"] > 0.2
