"""Quantization-aware training: train the draft through the rounding its shipped file applies.

A shipped draft stores its matrices int4 (or int8) (``specdec.distill.shipped.pack``); rounding
a draft trained in float costs acceptance (int8 -> int4 cost a 4-layer draft of the bundled
model 0.27 -> 0.22 held out). With :func:`fake_quantized` active, every forward reads the
matrices as the file will hold them and the gradient of the rounded weights updates the float
ones (the straight-through estimator, Courbariaux et al. 2015): the float weights learn to sit
where their rounding is right. The rounding is the file's own (:func:`shipped.roundtrip`), so a
draft trained this way ships exactly what it was trained as.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def fake_quantized(params: list[torch.nn.Parameter], bits: int | None):
    """Inside: each parameter in ``params`` holds its shipped rounding (``shipped.roundtrip`` decides
    which are rounded: the matrices); on exit its float value again (gradients computed inside stay, as the gradient w.r.t. the float weights). No-op for
    ``bits=None``."""
    from specdec.distill.shipped import roundtrip

    saved = []
    try:
        if bits is not None:
            with torch.no_grad():
                for p in params:
                    saved.append((p, p.data))
                    p.data = roundtrip(p.data, bits).to(p.dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data
