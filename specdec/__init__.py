"""specdec: lossless speculative decoding for Hugging Face causal LMs.

    import specdec
    out = specdec.generate(model, input_ids, draft_model=draft, max_new_tokens=256)
"""

from specdec.config import UnsupportedOption
from specdec.drafters import early_exit_model
from specdec.generate import generate
from specdec.sampling import SamplingConfig
from specdec.stats import GenerationStats

__all__ = ["generate", "GenerationStats", "SamplingConfig", "UnsupportedOption", "early_exit_model"]
__version__ = "0.1.0"
