"""int4 scale/zero search and GPTQ (CPU, tiny tensors and tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import VOCAB, prompts, tiny_model
from quant import Int4Linear, dequantize_int4, quantize, quantize_int4
from quant.gptq import gptq_int4, gptq_model, polish_codes, refit_scales_zeros
from quant.int4 import unpack_int4
from quant.search import quantize_int4_search


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These loops run many tiny ops: one thread avoids OpenMP hand-offs (50x slower on a busy host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _w(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g) * 3
    return w + (torch.rand(out_f, in_f, generator=g) < 0.02) * 8.0  # a few outliers, as in real weights


def _group_err(w: torch.Tensor, params, group: int) -> torch.Tensor:
    return (dequantize_int4(*params) - w).square().reshape(w.shape[0], -1, group).sum(-1)  # (out, n_groups)


def _correlated(rows: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features of very different scales, as activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    return torch.randn(rows, in_f, generator=g) @ mix * (0.2 + 3 * torch.rand(in_f, generator=g))


def _valid(params, out_f: int, in_f: int, group: int) -> None:
    packed, scales, zeros = params
    assert packed.dtype == torch.uint8 and packed.shape == (out_f, in_f // 2)
    assert scales.shape == zeros.shape == (out_f, in_f // group)
    assert int(unpack_int4(packed).max()) <= 15
    assert torch.isfinite(scales).all() and torch.isfinite(zeros).all() and (scales > 0).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group", [32, 64])
def test_search_never_worse_than_rtn_per_group(seed, group):
    w = _w(24, 4 * group, seed)
    searched = quantize_int4_search(w, group)
    _valid(searched, 24, 4 * group, group)
    rtn, found = _group_err(w, quantize_int4(w, group), group), _group_err(w, searched, group)
    assert (found <= rtn * (1 + 1e-5) + 1e-7).all()
    assert found.sum() < 0.9 * rtn.sum()  # and clearly better overall


def test_search_keeps_grids_that_are_exact():
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    w = codes * 0.25 - 1.0
    torch.testing.assert_close(dequantize_int4(*quantize_int4_search(w, 32)), w)


def test_gptq_lowers_output_error_below_rtn_and_search():
    torch.manual_seed(0)
    x, w = _correlated(2048, 128), _w(48, 128, 1)
    H = 2 * x.T @ x / x.shape[0]

    def out_err(params):
        return (x @ (w - dequantize_int4(*params)).T).square().sum().item()

    rtn, search = out_err(quantize_int4(w, 32)), out_err(quantize_int4_search(w, 32))
    plain, full = gptq_int4(w, H, 32, sweeps=-1), gptq_int4(w, H, 32)
    for params in (plain, full):
        _valid(params, 48, 128, 32)
    assert out_err(plain) < 0.8 * min(rtn, search)
    assert out_err(full) <= out_err(plain)


def test_refit_and_polish_never_raise_the_error():
    x, w = _correlated(1024, 64, 2), _w(16, 64, 3)
    H = 2 * x.T @ x / x.shape[0]

    def err(q, s, z):
        d = w - dequantize_int4(*_packed(q, s, z))
        return torch.einsum("ri,ij,rj->", d, H, d).item()

    packed, s, z = quantize_int4(w, 32)
    q = unpack_int4(packed).float()
    before = err(q, s, z)
    s, z = refit_scales_zeros(w, q, H, s, z)
    after_refit = err(q, s, z)
    q = polish_codes(w, q, s, z, H)
    assert after_refit <= before * (1 + 1e-5) and err(q, s, z) <= after_refit * (1 + 1e-5)


def _packed(q, s, z):
    from quant.int4 import pack_int4

    return pack_int4(q), s, z


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        gptq_int4(torch.randn(4, 48), torch.eye(48), 32)
    with pytest.raises(ValueError, match="H must be"):
        gptq_int4(torch.randn(4, 64), torch.eye(32), 32)


def _calibration(n: int = 6, t: int = 48, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_gptq_model_sets_weights_to_what_it_returns():
    model = tiny_model("llama", layers=1)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    params = gptq_model(model, names, 32, _calibration())
    assert set(params) == set(names)
    for name in names:
        layer = model.get_submodule(name)
        _valid(params[name], layer.out_features, layer.in_features, 32)
        torch.testing.assert_close(layer.weight, dequantize_int4(*params[name]), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_gptq_fits_calibration_better_than_rtn(arch):
    base, cal = tiny_model(arch, layers=2), _calibration()
    with torch.no_grad():
        ref = base(cal).logits

        def err(model):
            return (model(cal).logits - ref).square().mean().item()

        rtn = err(quantize(copy.deepcopy(base), bits=4, group_size=32, backend="reference"))
        q = quantize(copy.deepcopy(base), bits=4, group_size=32, backend="reference", method="gptq",
                     calibration=cal.tolist())  # a list of lists works too
        assert err(q) < rtn
    kinds = {type(m) for n, m in q.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))}
    assert kinds == {Int4Linear}


def test_ragged_calibration_and_auto_backend():
    base = tiny_model("llama", layers=1)
    cal = [list(range(3, 40)), list(range(5, 30)), list(range(7, 44))]
    q = quantize(copy.deepcopy(base), bits=4, group_size=32, method="gptq", calibration=cal)
    ids, mask = prompts(1, [10])
    with torch.no_grad():
        assert torch.isfinite(q(ids, attention_mask=mask).logits).all()


def test_method_errors_say_what_to_do():
    base = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="needs calibration=.*method='search'"):
        quantize(copy.deepcopy(base), bits=4, method="gptq")
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(copy.deepcopy(base), bits=4, method="awq")
    with pytest.raises(ValueError, match="applies to int4"):
        quantize(copy.deepcopy(base), bits=8, method="search")
    with pytest.raises(ValueError, match="only used by method='gptq'"):
        quantize(copy.deepcopy(base), bits=4, method="search", calibration=_calibration())
    with pytest.raises(ValueError, match="token ids"):
        quantize(copy.deepcopy(base), bits=4, method="gptq", calibration=torch.randn(2, 8))


def test_search_method_in_quantize():
    base = tiny_model("llama", layers=1)
    q = quantize(copy.deepcopy(base), bits=4, group_size=32, method="search", backend="reference")
    layer, orig = q.model.layers[0].mlp.up_proj, base.model.layers[0].mlp.up_proj.weight
    searched = dequantize_int4(layer.weight, layer.scales, layer.zeros)
    rtn = dequantize_int4(*quantize_int4(orig, 32))
    assert (searched - orig).square().sum() < (rtn - orig).square().sum()


def test_benchmark_calibration_shares_no_text_with_the_scored_pages():
    from benchmarks.quant_quality import calibration_ids, load_text

    class Chars:  # one token per character, so ids map back to text
        def __call__(self, text, return_tensors=None):
            return type("Out", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()

    ids, left_out = calibration_ids(Chars(), 8, 400)
    assert ids.shape == (8, 400) and {"execmodel", "compound", "naming", "try"} <= set(left_out)
    scored = load_text()
    for row in ids:
        text = "".join(map(chr, row.tolist()))
        assert not any(text[i:i + 80] in scored for i in range(0, 320, 20))
