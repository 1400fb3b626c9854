"""Resolve HF generation keywords (+ the model's generation_config) into one settings object.

Precedence is HF's: explicit keyword > ``generation_config=`` argument > the model's
own ``generation_config``.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

import torch

from specdec.sampling import SamplingConfig

# generation_config fields we honour; anything else set to a non-default value is refused
HONOURED = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
    "top_k", "top_p", "min_p", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
    "prompt_lookup_num_tokens", "return_dict_in_generate", "use_cache", "num_return_sequences",
    "num_beams", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "decoder_start_token_id", "transformers_version", "_from_model_config", "cache_implementation",
    "assistant_early_exit", "is_assistant", "max_matching_ngram_size", "compile_config",
    "disable_compile", "repetition_penalty", "top_h", "typical_p",
}


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingConfig
    eos_ids: tuple[int, ...]
    pad_id: int
    stop_strings: tuple[str, ...]
    return_dict: bool
    prompt_lookup_num_tokens: int | None = None  # from a generation_config (the keyword wins)


def resolve(model, prompt_len: int, generation_config=None, **kwargs) -> Settings:
    """Merge HF keywords into Settings; raise ValueError for what we cannot honour exactly."""
    if generation_config is not None and not callable(getattr(generation_config, "to_dict", None)):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}; pass options as keywords (max_new_tokens=...) "
                        "or GenerationConfig(**options)")
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    for key, value in kwargs.items():  # an explicit None counts, as in HF (eos_token_id=None: no EOS)
        if not hasattr(gc, key) and key not in HONOURED:
            raise TypeError(f"generate() got an unexpected keyword argument {key!r}")
        setattr(gc, key, value)
    _refuse_unsupported(gc)
    max_new = _max_new_tokens(gc, prompt_len)
    min_new = gc.min_new_tokens or max((gc.min_length or 0) - prompt_len, 0)
    eos = _as_tuple(gc.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = SamplingConfig(
        do_sample=bool(gc.do_sample),
        temperature=1.0 if gc.temperature is None else float(gc.temperature),
        top_k=gc.top_k, top_p=gc.top_p, min_p=getattr(gc, "min_p", None))
    stops = gc.stop_strings
    stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
    return Settings(max_new, int(min_new), sampling, eos, int(pad), stops, bool(gc.return_dict_in_generate),
                    getattr(gc, "prompt_lookup_num_tokens", None))


def _max_new_tokens(gc, prompt_len: int) -> int:
    name, value = ("max_new_tokens", gc.max_new_tokens) if gc.max_new_tokens is not None else \
        ("max_length", 20 if gc.max_length is None else gc.max_length)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    new = int(value) - (prompt_len if name == "max_length" else 0)
    if new < 1:
        why = "" if name == "max_new_tokens" else f" (max_length={value} with a {prompt_len}-token prompt)"
        raise ValueError(f"max_new_tokens must be >= 1 (as in HF), got {new}{why}: pass max_new_tokens=N")
    return new


def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tuple(int(i) for i in ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def _refuse_unsupported(gc) -> None:
    problems = []
    if (gc.num_beams or 1) > 1:
        problems.append(f"num_beams={gc.num_beams} (beam search)")
    if (gc.num_return_sequences or 1) > 1:
        problems.append(f"num_return_sequences={gc.num_return_sequences}")
    if gc.repetition_penalty not in (None, 1.0):
        problems.append(f"repetition_penalty={gc.repetition_penalty}")
    if getattr(gc, "typical_p", None) not in (None, 1.0):
        problems.append(f"typical_p={gc.typical_p}")
    if getattr(gc, "top_h", None) is not None:
        problems.append(f"top_h={gc.top_h}")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(gc, flag, False):
            problems.append(f"{flag}=True")
    for name in ("penalty_alpha", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                 "force_words_ids", "sequence_bias", "guidance_scale", "constraints", "forced_bos_token_id",
                 "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "watermarking_config",
                 "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "dola_layers",
                 "diversity_penalty", "renormalize_logits", "low_memory", "token_healing", "max_time",
                 "encoder_repetition_penalty", "remove_invalid_values", "assistant_ensemble_weight"):
        value = getattr(gc, name, None)
        if value not in (None, False, 0, 0.0, 1.0, []):
            problems.append(f"{name}={value!r}")
    if gc.return_dict_in_generate and getattr(gc, "use_cache", None) is not False:
        # HF's dict then carries the KV cache (past_key_values), which specdec does not hand out: its
        # cache holds rejected-draft slots, padding holes and runner-specific layouts
        problems.append("return_dict_in_generate=True with use_cache (HF's dict then holds past_key_values, "
                        "which specdec does not return; pass use_cache=False for the dict without it)")
    if problems:
        raise UnsupportedOption(", ".join(problems))


class UnsupportedOption(ValueError):
    """A generation option specdec cannot honour exactly (integrations fall back to HF)."""

    def __init__(self, what: str):
        super().__init__(f"specdec cannot honour {what}; call the model's original generate() "
                         "(a patched model falls back to it automatically)")
        self.what = what
