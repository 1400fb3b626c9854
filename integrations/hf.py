"""Drop-in speculative decoding for HF models and pipelines: ``patch``, ``unpatch``, ``patched``.

    patch(model, draft_model=draft)             # model.generate(...) now runs specdec.generate
    patch(pipe, prompt_lookup_num_tokens=8)     # a pipeline: its .model is patched
    unpatch(model)                              # the exact original generate() back

Only the instance's ``generate`` attribute is set (never the class), so other models are
untouched. A call specdec cannot honour exactly (beam search, output_scores, logits
processors, inputs_embeds, model kwargs such as past_key_values, an encoder-decoder
model, ...) runs the original ``generate`` with the caller's own arguments, after one
``SpecdecFallbackWarning`` per patched model and option.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import torch

import specdec
from specdec import options
from specdec.config import HONOURED, UnsupportedOption

# keywords a patched generate() accepts on top of HF's: specdec's own (stripped on fallback)
SPECDEC_KEYS = tuple(name for name in options.OPTIONS if name != "prompt_lookup_num_tokens")
# GenerationConfig fields that change the output but that specdec.generate would ignore
_OUTPUT_CHANGING = {"max_time": None, "encoder_repetition_penalty": 1.0, "remove_invalid_values": False,
                    "assistant_ensemble_weight": None}
_MISSING = object()

__all__ = ["PatchSettings", "SpecdecFallbackWarning", "is_patched", "last_stats", "patch", "patched", "unpatch"]


class SpecdecFallbackWarning(UserWarning):
    """A patched generate() ran the original HF generate() for an option specdec cannot honour."""


@dataclass(frozen=True)
class PatchSettings:
    """Defaults of a patched model's generate(); per-call keywords override them."""

    options: options.Options                  # specdec's options (see specdec.options.Options)
    tokenizer: object = None                  # for stop_strings (a pipeline's own by default)


@dataclass(frozen=True)
class _Call:
    """One HF generate() call, translated into specdec.generate's arguments."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kwargs: dict                              # everything else specdec.generate takes


class _PatchedGenerate:
    """What ``model.generate`` is while patched: translate, run specdec, or fall back."""

    def __init__(self, model, original, own, settings: PatchSettings):
        self.model = model
        self.original = original        # the generate() callable before patching (bound method or own attr)
        self.own = own                  # model.__dict__["generate"] before patching, or _MISSING
        self.settings = settings
        self.warned: set[str] = set()   # option names already warned about
        self.last_stats = None          # GenerationStats of the latest specdec call
        self.__wrapped__ = original     # inspect.signature / help() show HF's generate
        self.__doc__ = getattr(original, "__doc__", None)

    def __call__(self, *args, **kwargs):
        call = _translate(self.model, self.settings, args, kwargs)
        if isinstance(call, str):
            return self._fallback(call, args, kwargs)
        wants_stats = call.kwargs.pop("return_stats")
        try:
            with torch.no_grad():
                out, self.last_stats = specdec.generate(self.model, call.input_ids, call.attention_mask,
                                                        return_stats=True, **call.kwargs)
        except UnsupportedOption as exc:
            return self._fallback(exc.what, args, kwargs)
        return (out, self.last_stats) if wants_stats else out

    def _fallback(self, what: str, args, kwargs):
        names = set(re.findall(r"(\w+)=", what)) or set(what.split(", "))
        if not names <= self.warned:
            self.warned |= names
            warnings.warn(f"specdec cannot honour {what}: {type(self.model).__name__}.generate() runs the "
                          "original Hugging Face generate() for such calls (warned once per option)",
                          SpecdecFallbackWarning, stacklevel=3)
        hf_kwargs = {k: v for k, v in kwargs.items() if k not in SPECDEC_KEYS}
        return self.original(*args, **hf_kwargs)

    def __deepcopy__(self, memo):
        # a deep-copied model gets a patch of its own (the copy's original generate, fresh warnings)
        model = copy.deepcopy(self.model, memo)
        original = copy.deepcopy(self.original, memo)  # a bound method: rebound to the copy
        own = self.own if self.own is _MISSING else copy.deepcopy(self.own, memo)
        return _PatchedGenerate(model, original, own, self.settings)

    def __repr__(self):
        return f"<specdec-patched generate of {type(self.model).__name__}>"


def patch(obj, draft_model=None, *, tokenizer=None, **specdec_options):
    """Make ``obj.generate`` (a model's, or a pipeline's model's) run ``specdec.generate``.

    Args:
        obj: a ``PreTrainedModel`` (decoder-only) or a transformers ``Pipeline``.
        draft_model: a causal LM sharing the target's tokenizer, ``"self:N"`` (the target's first N
            layers), ``"distilled"`` (the shipped distilled draft; loaded once, here) or a
            ``FeatureDraft``. A call's ``assistant_model=`` / ``draft_model=`` overrides it.
        tokenizer: for ``stop_strings`` (defaults to a pipeline's tokenizer).
        **specdec_options: any of ``specdec.generate``'s own options, with the same meaning and
            checks (``specdec.options.Options``): ``num_draft_tokens``, ``prompt_lookup_num_tokens``,
            ``prefix_cache``, ``cache_namespace`` (here also a callable ``(input_ids, call_kwargs) ->
            str`` evaluated per call, e.g. reading a ``contextvars.ContextVar`` set per request; tenants
            never share cached blocks), ``kv_quant``, ``compile`` (``True``: static cache + CUDA graphs,
            captured on the first call and reused by later calls of any prompt length and of batch
            sizes up to the next power of two), ``generator``, ``return_stats`` (models only: a
            pipeline needs generate() to return tokens; read ``last_stats(pipe)`` instead).
            A call's keywords of the same names override these.

    Patching again replaces the settings and keeps the true original. Returns ``obj``.
    """
    model, default_tokenizer = _target(obj)
    opts = options.check(options.from_keywords("patch()", specdec_options, draft_model=draft_model),
                         namespace_callable=True)
    if opts.return_stats and model is not obj:
        raise ValueError("return_stats=True would make the pipeline's generate() return (output, stats), which "
                         "pipelines cannot read: use integrations.last_stats(pipe) after a call instead")
    opts = replace(opts, draft_model=options.resolve_draft(opts.draft_model, model))
    settings = PatchSettings(opts, tokenizer if tokenizer is not None else default_tokenizer)
    current = _patch_of(model)
    if current is not None:
        current.settings = settings
        return obj
    own = vars(model).get("generate", _MISSING)
    vars(model)["generate"] = _PatchedGenerate(model, model.generate, own, settings)
    return obj


def unpatch(obj):
    """Restore the original ``generate`` exactly (a no-op if ``obj`` is not patched). Returns ``obj``."""
    model, _ = _target(obj)
    current = _patch_of(model)
    if current is None:
        return obj
    if current.own is _MISSING:
        del vars(model)["generate"]
    else:
        vars(model)["generate"] = current.own
    return obj


@contextmanager
def patched(obj, draft_model=None, **settings):
    """``with patched(model, draft_model=d): ...`` patches inside, restores on exit (even on error).

    If ``obj`` was already patched, its previous settings come back on exit.
    """
    model, _ = _target(obj)
    before = _patch_of(model)
    saved = before.settings if before is not None else None
    patch(obj, draft_model, **settings)
    try:
        yield obj
    finally:
        if saved is None:
            unpatch(obj)
        else:
            _patch_of(model).settings = saved


def is_patched(obj) -> bool:
    """Whether ``obj`` (a model or pipeline) has a specdec-patched generate."""
    return _patch_of(_target(obj)[0]) is not None


def last_stats(obj):
    """``GenerationStats`` of the latest call a patched ``obj`` ran through specdec (else None)."""
    current = _patch_of(_target(obj)[0])
    return current.last_stats if current is not None else None


def _target(obj):
    """(model, default tokenizer) for a model or a pipeline."""
    if isinstance(obj, torch.nn.Module):
        if not callable(getattr(obj, "generate", None)):
            raise TypeError(f"{type(obj).__name__} has no generate(): patch a causal LM (AutoModelForCausalLM)")
        return obj, None
    model = getattr(obj, "model", None)
    if isinstance(model, torch.nn.Module) and callable(getattr(model, "generate", None)):
        return model, getattr(obj, "tokenizer", None)
    raise TypeError(f"cannot patch a {type(obj).__name__}: pass a PreTrainedModel or a transformers Pipeline "
                    "whose .model can generate()")


def _patch_of(model) -> _PatchedGenerate | None:
    current = vars(model).get("generate")
    return current if isinstance(current, _PatchedGenerate) else None


# ---------------------------------------------------------------- translating one call

@functools.cache
def _hf_signature() -> inspect.Signature:
    from transformers.generation.utils import GenerationMixin

    return inspect.signature(GenerationMixin.generate)


@functools.cache
def _generation_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(k for k in vars(GenerationConfig()) if not k.startswith("_")) | HONOURED


_HANDLED_PARAMS = {"self", "inputs", "generation_config", "assistant_model", "streamer", "kwargs"}
_CALL_KEYS = {"input_ids", "attention_mask", "tokenizer", "prompt_lookup_num_tokens", "assistant_model",
              *SPECDEC_KEYS}


def _translate(model, settings: PatchSettings, args, kwargs) -> _Call | str:
    """specdec.generate's arguments for this HF call, or why it must fall back (a string)."""
    from transformers.generation.utils import GenerationMixin

    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if getattr(type(model), "generate", None) is not GenerationMixin.generate:
        return f"the custom generate() of {type(model).__name__}"
    try:
        bound = _hf_signature().bind(model, *args, **kwargs)
    except TypeError:
        return "these arguments"  # HF raises its own error for them
    params = dict(bound.arguments)
    extra = params.pop("kwargs", {})
    refused = _refused(params, extra)
    if refused:
        return refused
    ids = _input_ids(params.get("inputs"), extra.get("input_ids"))
    if isinstance(ids, str):
        return ids
    gen_kwargs = {k: v for k, v in extra.items() if k not in _CALL_KEYS}
    generation_config = params.get("generation_config")
    ignored = _output_changing(model, generation_config, gen_kwargs)
    if ignored:
        return ignored
    mask = extra.get("attention_mask")
    if mask is None:
        mask = _infer_mask(model, ids, generation_config, gen_kwargs)
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and bool((mask[:, -1] == 0).any()):
        return "right-padded inputs (padding_side='right'; decoder-only models want tokenizer.padding_side='left')"
    call_kwargs = dict(generation_config=generation_config, streamer=params.get("streamer"),
                       tokenizer=_first(extra.get("tokenizer"), settings.tokenizer), **gen_kwargs)
    call_kwargs.update(_drafting(settings, params, extra, generation_config))
    call_kwargs.update(_caching(settings, ids, extra, kwargs))
    return _Call(ids, mask, call_kwargs)


def _first(value, default):
    return value if value is not None else default


def _refused(params: dict, extra: dict) -> str:
    """Names of the call's options that always need HF's own generate(), joined ('' if none)."""
    # logits_processor, stopping_criteria, ... (and any parameter a newer HF adds) unless off
    problems = [name for name, value in params.items()
                if name not in _HANDLED_PARAMS and not _is_off(value)]
    keys = _generation_keys()
    # model kwargs (inputs_embeds, past_key_values, ...), assistant_tokenizer, typos: HF's to judge
    problems += [name for name, value in extra.items()
                 if name not in _CALL_KEYS and name not in keys and value is not None]
    if extra.get("cache_implementation") == "paged":
        problems.append("cache_implementation='paged'")  # HF switches to continuous batching
    return ", ".join(problems)


def _is_off(value) -> bool:
    return value is None or value is False or (isinstance(value, list) and not value)


def _input_ids(inputs, input_ids) -> torch.Tensor | str:
    if inputs is not None and input_ids is not None:
        return "both inputs and input_ids"
    ids = inputs if inputs is not None else input_ids
    if ids is None:
        return "a call without input_ids"
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32) or ids.dim() != 2:
        return "inputs that are not a (batch, length) integer tensor"
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        return "an empty prompt"
    return ids


def _setting(model, generation_config, gen_kwargs: dict, name: str):
    """A generation option's value by HF's precedence: keyword > generation_config= > the model's."""
    if name in gen_kwargs:
        return gen_kwargs[name]
    config = generation_config if generation_config is not None else model.generation_config
    return getattr(config, name, None)


def _output_changing(model, generation_config, gen_kwargs: dict) -> str:
    """Options that change HF's output but that specdec.generate does not refuse (it would ignore them)."""
    problems = []
    for name, off in _OUTPUT_CHANGING.items():
        value = _setting(model, generation_config, gen_kwargs, name)
        if value is not None and value != off:
            problems.append(f"{name}={value!r}")
    return ", ".join(problems)


def _infer_mask(model, ids: torch.Tensor, generation_config, gen_kwargs: dict) -> torch.Tensor:
    """HF's attention mask for a call without one: pad positions masked when pad != EOS."""
    pad = _setting(model, generation_config, gen_kwargs, "pad_token_id")
    eos = _setting(model, generation_config, gen_kwargs, "eos_token_id")
    eos = set(eos.tolist() if isinstance(eos, torch.Tensor) else eos if isinstance(eos, (list, tuple))
              else [] if eos is None else [eos])
    if pad is None or int(pad) in eos or not bool((ids == int(pad)).any()):
        return torch.ones_like(ids)
    return ids.ne(int(pad)).long()


def _drafting(settings: PatchSettings, params: dict, extra: dict, generation_config) -> dict:
    """The drafter: the call's assistant/draft model or prompt lookup, else the patch's defaults."""
    defaults = settings.options
    draft = extra.get("draft_model", params.get("assistant_model"))
    k = extra.get("num_draft_tokens", defaults.num_draft_tokens)
    if draft is not None:  # a draft model wins over prompt lookup: drafting never changes the output
        return dict(draft_model=draft, num_draft_tokens=k)
    lookup = extra.get("prompt_lookup_num_tokens")
    if lookup is None and generation_config is not None:
        lookup = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if lookup is not None:
        return dict(prompt_lookup_num_tokens=lookup, num_draft_tokens=k)
    return dict(draft_model=defaults.draft_model, prompt_lookup_num_tokens=defaults.prompt_lookup_num_tokens,
                num_draft_tokens=k)


def _caching(settings: PatchSettings, ids: torch.Tensor, extra: dict, call_kwargs: dict) -> dict:
    """The call's remaining specdec options: its own keywords over the patch's defaults."""
    namespace = extra.get("cache_namespace", settings.options.cache_namespace)
    if callable(namespace):
        namespace = namespace(ids, dict(call_kwargs))
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError(f"the cache_namespace callable returned {type(namespace).__name__}; it must return "
                            "a str (the tenant key) or None")
    names = ("prefix_cache", "kv_quant", "compile", "generator", "return_stats")
    return dict(cache_namespace=namespace, **{name: extra.get(name, getattr(settings.options, name)) for name in names})
