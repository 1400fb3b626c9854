"""Joined sibling projections (specdec.fused_linear): same outputs, one product per group, safe saves."""

import pytest
import torch
from torch import nn

import specdec
from specdec import static
from specdec.fused_linear import _FusedLinear, fused_projections, join_projections
from tests.conftest import tiny_model


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return tiny_model("llama").eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_joining_keeps_outputs_parameters_and_memory(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    before = _logits(model, ids)
    params = {name: p for name, p in model.named_parameters()}
    groups = join_projections(model)
    layers = model.config.num_hidden_layers
    assert len(groups) == 2 * layers                                      # q/k/v and gate/up per layer
    assert {name: p for name, p in model.named_parameters()} == params     # same Parameter objects
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == groups[0].weight[groups[0].bounds[1][0]].data_ptr()  # a view
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
    with fused_projections(groups):
        assert type(attn.q_proj) is _FusedLinear
        torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert type(attn.q_proj) is nn.Linear
    assert join_projections(model)[0] is groups[0]                         # joining twice: same groups


def test_one_product_per_group_and_out_of_order_calls_stay_correct(model):
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(1, 3, model.config.hidden_size), torch.randn(1, 3, model.config.hidden_size)
    expected = [nn.functional.linear(x, m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    groups = join_projections(model)
    calls = []
    real_linear = torch.nn.functional.linear
    with fused_projections(groups):
        torch.nn.functional.linear = lambda *a, **k: calls.append(a[1].shape[0]) or real_linear(*a, **k)
        try:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            assert calls == [groups[0].weight.shape[0]]                    # one product for the three
            calls.clear()
            assert torch.equal(attn.k_proj(other), real_linear(other, attn.k_proj.weight))  # alone, other input
            assert torch.equal(attn.v_proj(x), real_linear(x, attn.v_proj.weight))          # out of order
            assert calls == [attn.k_proj.out_features, attn.v_proj.out_features]
        finally:
            torch.nn.functional.linear = real_linear
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got, want)


def test_state_dict_and_save_pretrained_see_separate_tensors(model, tmp_path):
    join_projections(model)
    state = model.state_dict()
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_replaced_weights_are_detected_not_used(model):
    groups = join_projections(model)
    model.double()                                                         # new tensors, no longer views
    assert not groups[0].intact()
    with pytest.raises(RuntimeError, match="release"):
        with fused_projections(groups):
            pass


def test_hooked_members_are_left_alone(model):
    attn = model.model.layers[0].self_attn
    attn.k_proj.register_forward_hook(lambda *a: None)
    groups = join_projections(model)
    assert all(attn.q_proj not in g.members for g in groups)
    assert len(groups) == 2 * model.config.num_hidden_layers - 1


def test_compile_greedy_identical_with_joined_projections_and_release(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    plain = specdec.generate(model, ids, max_new_tokens=16)
    fast = specdec.generate(model, ids, max_new_tokens=16, compile=True, draft_model="self:1", num_draft_tokens=3)
    assert torch.equal(plain, fast)
    assert static.release(model) >= 1
    model.double()
    again = specdec.generate(model, ids.clone(), max_new_tokens=16, compile=True)
    assert torch.equal(specdec.generate(model, ids, max_new_tokens=16), again)


def test_torch_compile_traces_the_joined_group(model):
    """Dynamo follows the first member's hand-off to the next ones (CPU Inductor, like compile='inductor')."""
    pytest.importorskip("torch._inductor")
    groups = join_projections(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    want = _logits(model, ids)
    compiled = torch.compile(lambda m, i: m(input_ids=i).logits, backend="aot_eager")
    with fused_projections(groups), torch.no_grad():
        got = compiled(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_quantized_model_gets_a_new_runner(model):
    """Quantizing after compile=True replaces the linears: the old runner (its graphs read the old
    weights' memory) is dropped and a new one built, and the output is the quantized model's."""
    from quant import quantize

    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    specdec.generate(model, ids, max_new_tokens=4, compile=True)
    def runners():
        return {r for r in static._RUNNERS.values() if r._model_ref() is model}

    before = runners()
    quantize(model, bits=8)
    fast = specdec.generate(model, ids, max_new_tokens=8, compile=True)
    assert before and not runners() & before
    assert torch.equal(fast, specdec.generate(model, ids, max_new_tokens=8))


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        join_projections("model")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        static.release(None)


def _quantized(model, bits):
    from quant import quantize

    return quantize(model, bits=bits, group_size=32, backend="reference")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_members_join_bit_identically(model, bits):
    """Codes, scales (and zeros) joined along the output rows: the same outputs, to the bit (CPU)."""
    from quant import Int4Linear, Int8Linear

    kind = Int8Linear if bits == 8 else Int4Linear
    model = _quantized(model, bits)
    attn = model.model.layers[0].self_attn
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        before, alone = _logits(model, ids), [m(x) for m in qkv]
    groups = join_projections(model)
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert type(groups[0].joined) is kind and groups[0].joined.out_features == sum(m.out_features for m in qkv)
    assert attn.k_proj.scales.data_ptr() == groups[0].joined.scales[groups[0].bounds[1][0]:].data_ptr()   # a view
    with fused_projections(groups), torch.no_grad():
        assert type(attn.q_proj).__name__ == f"_Fused{kind.__name__}"
        assert torch.equal(_logits(model, ids), before)
        joined = [m(x) for m in qkv]
    assert type(attn.q_proj) is kind
    assert all(torch.equal(a, b) for a, b in zip(joined, alone))
    state = model.state_dict()
    q, k = state["model.layers.0.self_attn.q_proj.scales"], state["model.layers.0.self_attn.k_proj.scales"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()   # saved as separate tensors


def test_unlike_or_tinygemm_members_stay_apart(model):
    from quant import Int4Linear

    model = _quantized(model, 8)
    model.model.layers[0].self_attn.v_proj.backend = "torch"                  # another backend than q, k
    groups = join_projections(model)
    assert len(groups) == 2 * model.config.num_hidden_layers - 1
    tiny = tiny_model("llama")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no tinygemm CPU kernel")
    from quant import quantize

    quantize(tiny, bits=4, group_size=32, backend="tinygemm")
    assert isinstance(tiny.model.layers[0].mlp.up_proj, Int4Linear) and join_projections(tiny) == []


def test_compile_greedy_identical_with_joined_int4_projections(model):
    model = _quantized(model, 4)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    plain = specdec.generate(model, ids, max_new_tokens=12)
    fast = specdec.generate(model, ids, max_new_tokens=12, compile=True, draft_model="self:1", num_draft_tokens=3)
    assert torch.equal(plain, fast)
    assert getattr(model.model.layers[0].mlp.up_proj, "_joined", None) is not None   # the runner joined them
