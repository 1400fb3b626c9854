"""Weight-only matmul kernels alone, on Llama-3-8B's layer shapes: weight bytes read per second.

For each layer shape (q/k/v and gate/up joined, as the compiled path runs them) and activation row
count (1: decode; 4, 16: verify of a draft), times one call of every backend (bf16 ``F.linear``,
int8 ``torch`` / ``triton`` / ``reference``, int4 ``tinygemm`` / ``triton`` / ``reference``) and
of the Triton kernels under alternative tile sizes, as a CUDA graph replays them over copies of the
layer that outgrow L2 (``quant.timing``: GPU time, weights from device memory). ``GBps`` is the
layer's stored weight bytes (codes, scales, zeros) over that time, ``copy_fraction`` that over the
device-to-device copy bandwidth measured in the same run, ``max_rel_error`` the largest difference
from the format's reference layer over its largest output. ``best`` names the fastest Triton config
per (format, shape, rows) next to the default one (``quant.triton_ops.int8_config`` /
``int4_config``). Baselines run first and rows not begun by ``--deadline`` are skipped, so the JSON
is always written.

    python -m benchmarks.quant_kernels --out benchmarks/results          # one H100, ~2-3 min
    python -m benchmarks.quant_kernels --device cpu --shapes tiny --sweep none  # smoke test (no Triton)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from specdec.quant import Int4Linear, Int8Linear
from specdec.quant.timing import seconds as layer_seconds

from . import report
from .quant_speed import copy_bandwidth

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "tiny": (96, 128)}          # name -> (out_features, in_features)
BACKENDS = {"bf16": ("bf16",), "int8": ("torch", "triton", "reference"), "int4": ("tinygemm", "triton", "reference")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=["qkv", "o", "gate_up", "down"], choices=list(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16], help="activation rows (M)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sweep", choices=("grid", "none"), default="grid", help="also time alternative Triton tiles")
    p.add_argument("--deadline", type=float, default=200.0, help="seconds after which rows not begun are skipped")
    p.add_argument("--out", default="benchmarks/results", help="directory for quant-kernels-<device>.json")
    return p.parse_args(argv)


class Configured(nn.Module):
    """A Triton product under an explicit ``KernelConfig`` (its tensors are buffers, so copies copy them)."""

    def __init__(self, layer: nn.Module, config):
        super().__init__()
        self.config, self.int4 = config, isinstance(layer, Int4Linear)
        self.group_size = getattr(layer, "group_size", None)
        for name in ("weight", "scales", "zeros"):
            if hasattr(layer, name):
                self.register_buffer(name, getattr(layer, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from specdec.quant import triton_ops

        if self.int4:
            return triton_ops.int4_linear(x, self.weight, self.scales, self.zeros, self.group_size, None, self.config)
        return triton_ops.int8_linear(x, self.weight, self.scales, None, self.config)


def tile_grid(fmt: str, rows: int, group_size: int) -> list:
    """Alternative Triton tiles around the defaults: GEMV for one row, tl.dot tiles for more."""
    from specdec.quant.triton_ops import KernelConfig

    if rows == 1:   # steps in codes: 0.5-2 KB a row of int8, 0.5-2 KB a row of int4 (twice the codes)
        steps = (512, 1024, 2048) if fmt == "int8" else (max(group_size, 1024), 2048, 4096)
        return [KernelConfig(1, bn, bk, w, 2) for bn, bk, w in itertools.product((2, 4, 8), steps, (4, 8))] \
            + [KernelConfig(1, 4, steps[1], 8, s) for s in (1, 3)]
    bm = min(64, max(16, 1 << (rows - 1).bit_length()))
    steps = (128, 256) if fmt == "int8" else (2 * group_size, 4 * group_size)
    return [KernelConfig(bm, bn, bk, 4, s) for bn, bk, s in itertools.product((16, 32, 64), steps, (3, 4))]


def stored_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's weights as stored (codes, scales, zeros; bf16 weight)."""
    return sum(t.numel() * t.element_size() for t in (*layer.buffers(), *layer.parameters()))


def build(fmt: str, backend: str, lin: nn.Linear, group_size: int) -> nn.Module:
    if fmt == "bf16":
        return lin
    if fmt == "int8":
        return Int8Linear.from_linear(lin, backend)
    return Int4Linear.from_linear(lin, group_size, backend)


@torch.no_grad()
def measure(layer: nn.Module, x: torch.Tensor, nbytes: int, bandwidth: float, reference: nn.Module) -> dict:
    """Time of one call, and its largest error relative to the reference layer's largest output."""
    want = reference(x).float()
    error = (layer(x).float() - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    seconds = layer_seconds(layer, x)
    return {"seconds": seconds, "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9,
            "copy_fraction": nbytes / seconds / bandwidth, "max_rel_error": error}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start, device = time.perf_counter(), torch.device(args.device)
    env = report.environment()
    out = Path(args.out) / f"quant-kernels-{report.device_slug(env) if device.type == 'cuda' else 'cpu'}.json"
    bandwidth = copy_bandwidth(device, 2 << 30 if device.type == "cuda" else 16 << 20)
    result = {"schema": 1, "environment": env, "device": str(device), "copy_bandwidth_GBps": bandwidth / 1e9,
              "command": "python -m benchmarks.quant_kernels " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": vars(args), "rows": [], "best": []}

    def emit(row: dict) -> None:
        result["rows"].append(row)
        report.write_json(result, out)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "traceback"}
        print(f"[{time.perf_counter() - start:6.1f}s] {shown}", flush=True)

    layers = {}
    for name in args.shapes:
        n, k = SHAPES[name]
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        for fmt, backends in BACKENDS.items():
            for backend in backends:
                try:
                    layers[name, fmt, backend] = build(fmt, backend, lin, args.group_size)
                except Exception as err:  # noqa: BLE001 - a backend missing here is a row, not a crash
                    emit({"shape": name, "format": fmt, "backend": backend, "error": f"{type(err).__name__}: {err}"})
    plan = [(key, m, None) for key in layers for m in args.rows]
    if args.sweep == "grid":
        plan += [(key, m, c) for key in layers if key[2] == "triton" for m in args.rows
                 for c in tile_grid(key[1], m, args.group_size)]
    for (name, fmt, backend), m, config in plan:
        n, k = SHAPES[name]
        row = {"shape": name, "n": n, "k": k, "rows": m, "format": fmt, "backend": backend,
               "config": None if config is None else vars(config)}
        if time.perf_counter() - start > args.deadline:
            emit({**row, "error": "skipped: deadline"})
            continue
        layer = layers[name, fmt, backend]
        try:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            reference = layers.get((name, fmt, "reference"), layer)
            row.update(measure(layer if config is None else Configured(layer, config), x, stored_bytes(layer),
                               bandwidth, reference))
        except Exception as err:  # noqa: BLE001 - e.g. a tile that needs more shared memory than there is
            row.update(error=f"{type(err).__name__}: {str(err)[:300]}", traceback=traceback.format_exc(limit=3))
        emit(row)
    result["best"] = best_configs(result["rows"])
    result["total_seconds"] = time.perf_counter() - start
    report.write_json(result, out)
    print(f"wrote {out}", flush=True)
    return result


def best_configs(rows: list[dict]) -> list[dict]:
    """Per (shape, rows): microseconds of each backend (default tiles) and of the fastest Triton tiles."""
    done = [r for r in rows if r.get("seconds")]
    out = []
    for shape, m in sorted({(r["shape"], r["rows"]) for r in done}):
        same = [r for r in done if (r["shape"], r["rows"]) == (shape, m)]
        entry = {"shape": shape, "rows": m,
                 "us": {f"{r['format']}:{r['backend']}": r["us"] for r in same if r["config"] is None}}
        for fmt in ("int8", "int4"):
            tiles = [r for r in same if r["format"] == fmt and r["config"] is not None]
            if tiles:
                best = min(tiles, key=lambda r: r["seconds"])
                entry[f"{fmt}_best_tiles"] = {"config": best["config"], "us": best["us"], "GBps": best["GBps"]}
        out.append(entry)
    return out


if __name__ == "__main__":
    main()
