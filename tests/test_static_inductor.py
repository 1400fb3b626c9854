"""compile='inductor' on CPU: the KV write stays in place (no copy of the whole cache per layer)."""

import shutil

import pytest
import torch

from specdec.static import StaticRunner
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor on CPU needs a C++ compiler")


def test_kv_write_is_in_place_in_the_compiled_step():
    """An index_copy_ into the static buffer, seen by the compiled graph next to a view of that buffer
    (the attention window), was functionalized into index_put + a copy of the whole buffer back, two
    kernels per layer and step (~13% of an 8B step on an H100, benchmarks/results/h100/step-kernels-llama-8b.json).
    Writing through the window leaves Inductor an in-place index_put_ and no copy_."""
    import logging

    graphs = []

    class Keep(logging.Handler):
        def emit(self, record):
            graphs.append(record.getMessage())

    import torch._inductor.config as inductor_config

    torch._logging.set_logs(post_grad_graphs=True)
    log = logging.getLogger("torch._inductor.compile_fx.__post_grad_graphs")  # the final post-grad graphs
    handler = Keep()
    log.addHandler(handler)
    no_cache = inductor_config.patch(fx_graph_cache=False)  # a cache hit would log no graph
    no_cache.__enter__()

    model = tiny_model("llama", layers=2)
    runner = StaticRunner(model, 1, 256, use_graphs=False, fuse=True)
    cache = runner.new_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    eager = StaticRunner(model, 1, 256, use_graphs=False, fuse=False)
    eager_cache = eager.new_cache()
    try:
        for r, c in ((runner, cache), (eager, eager_cache)):
            r.forward(ids, torch.ones(1, 20, dtype=torch.long), torch.arange(20)[None], c)
        for step in range(2):
            n = cache.length
            args = (ids[:, step:step + 1], torch.ones(1, n + 1, dtype=torch.long), torch.tensor([[n]]))
            torch.testing.assert_close(runner.forward(*args, cache), eager.forward(*args, eager_cache), rtol=1e-4, atol=1e-4)
    finally:
        no_cache.__exit__(None, None, None)
        torch._logging.set_logs()
        log.removeHandler(handler)
    text = "\n".join(graphs)
    assert "aten.index_put_.default" in text        # written in place ...
    assert "aten.copy_.default" not in text         # ... and not copied back whole


def test_no_compilation_inside_the_decode_loop(monkeypatch):
    """compile="inductor": every shape a call can meet (1..k+1 tokens, every attention window) is
    compiled in the warm-up before the prefill (capture_all); the decode loop compiles nothing, and a
    later call with other lengths compiles nothing at all (torch._dynamo's own counters)."""
    from torch._dynamo.utils import counters

    import specdec
    from specdec import static
    from tests.conftest import prompts

    def compiled() -> int:
        return counters["stats"]["unique_graphs"]

    after_warm_up = []
    capture_all = static.StaticRunner.capture_all

    def recorded(self):
        capture_all(self)
        after_warm_up.append(compiled())

    monkeypatch.setattr(static.StaticRunner, "capture_all", recorded)
    model = tiny_model("llama", layers=2)
    for prompt_len, new in [(12, 300), (7, 40)]:  # 300 new tokens cross the first 256-slot attention window
        ids, mask = prompts(1, [prompt_len], seed=prompt_len)
        out = specdec.generate(model, ids, mask, compile="inductor", prompt_lookup_num_tokens=4, num_draft_tokens=4,
                               max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert out.shape[1] == prompt_len + new
        assert compiled() == after_warm_up[-1] > 0, "compiled inside the decode loop"
    assert after_warm_up[-1] == after_warm_up[0], "the second call compiled again"
    assert not counters["recompiles"]
