"""Weight-only (int8 per-channel, int4 group-wise) and KV-cache (KIVI int8/int4) quantization.

    from specdec import quant
    quant.quantize(model, bits=4, group_size=64)          # swaps nn.Linear in place
    quant.quantize(model, bits=4, method="gptq", calibration=token_ids)  # (N, T): lower error
    cache = quant.QuantizedKVCache(model.config, bits=8)   # past_key_values= (cache= in transformers 5.2x)
"""

from .int4 import Int4Linear, dequantize_int4, quantize_int4
from .gptq import gptq_int4
from .int8 import Int8Linear, dequantize_int8, quantize_int8
from .kv import QuantizedKVCache
from .search import quantize_int4_search
from .swap import quantize

__all__ = ["quantize", "Int8Linear", "Int4Linear", "QuantizedKVCache",
           "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "quantize_int4_search",
           "gptq_int4"]
