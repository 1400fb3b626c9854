"""How long one call of a layer takes, for ``quantize(backend="auto")`` to compare kernels.

On CUDA the calls are timed as a CUDA graph replays them, which is how the compiled decoding path
runs them: the GPU time alone, without Python and launch overhead (which would favour kernels
launched from C++ over Triton's Python launcher, and which graphs remove). The graph runs the call
over enough copies of the layer to outgrow the L2 cache, so the weights come from device memory as
in a real decode step rather than from L2 as in a loop over one small layer.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

MAX_COPIES = 32


@torch.no_grad()
def wall_seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of ``layer(x)`` after one warm-up call, synchronized on CUDA."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    layer(x)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        layer(x)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _copies(layer: nn.Module, device: torch.device) -> list[nn.Module]:
    """The layer and deep copies of it, twice the L2 cache together (at most MAX_COPIES)."""
    size = sum(t.numel() * t.element_size() for t in layer.buffers()) + \
        sum(p.numel() * p.element_size() for p in layer.parameters())
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    count = min(MAX_COPIES, max(1, math.ceil(2 * l2 / max(size, 1))))
    return [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]


@torch.no_grad()
def graph_seconds(layer: nn.Module, x: torch.Tensor, replays: int = 5) -> float:
    """Median GPU time of one ``layer(x)`` call in a replayed CUDA graph (see the module docstring)."""
    layers = _copies(layer, x.device)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):   # warm-up off the capture: kernels compile, workspaces are made
        for lay in layers:
            lay(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for lay in layers:
            lay(x)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(layers))
    return sorted(times)[len(times) // 2]


def seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """GPU time of one call as a graph replays it on CUDA (wall time if the call cannot be captured);
    wall time elsewhere."""
    if x.device.type != "cuda":
        return wall_seconds(layer, x)
    with torch.cuda.device(x.device):   # the capture runs on the current device
        try:
            return graph_seconds(layer, x)
        except RuntimeError:   # not capturable: eager timing is what it would cost
            torch.cuda.synchronize(x.device)
            return wall_seconds(layer, x)
