"""specdec: lossless speculative decoding for Hugging Face causal LMs.

    import specdec
    out = specdec.generate(model, input_ids, draft_model=draft, max_new_tokens=256)
"""

from specdec import _source_tree

_source_tree.install()  # in a checkout, specdec.quant (...) is its top-level quant/ (see that module)

from specdec.config import UnsupportedOption  # noqa: E402
from specdec.drafters import early_exit_model  # noqa: E402
from specdec.generate import generate  # noqa: E402
from specdec.sampling import SamplingConfig  # noqa: E402
from specdec.stats import GenerationStats  # noqa: E402

__all__ = ["generate", "GenerationStats", "SamplingConfig", "UnsupportedOption", "early_exit_model"]
__version__ = "0.1.0"
