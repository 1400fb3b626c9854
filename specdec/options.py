"""specdec's own keywords: defined, documented and validated in one place.

``specdec.generate``, ``integrations.patch`` and a patched model's per-call keywords all
check their options here, so every option means the same and accepts the same values on
every path (a test walks ``OPTIONS`` through each of them).

HF's own generation keywords (``max_new_tokens``, ``do_sample``, ...) are resolved by
``specdec.config``; ``prompt_lookup_num_tokens`` is HF's name and ours alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

DISTILLED_NAMES = ("distilled", "distilled-feature", "distilled-layers")
KV_QUANT_MODES = (None, "int8", "int4")
COMPILE_MODES = (False, True, "graphs", "inductor")


@dataclass(frozen=True)
class Options:
    """specdec's keywords on top of HF's, with their defaults."""

    draft_model: object = None
    """A causal LM sharing the target's tokenizer; ``"self:N"`` (the target's first N layers and its
    head); ``"distilled"`` (the best draft shipped for the target, ``"distilled-layers"`` /
    ``"distilled-feature"`` pick a kind); or a ``FeatureDraft`` built on this target."""
    num_draft_tokens: int | str = "auto"
    """Draft length k >= 1, or ``"auto"``: chosen each step from measured acceptance and costs,
    0 (plain decoding) included."""
    prompt_lookup_num_tokens: int | None = None
    """Draft by n-gram lookup in prompt + output (no model), at most this many tokens a step."""
    prefix_cache: object = None
    """A ``prefix_cache.PrefixCache`` reused across calls."""
    cache_namespace: object = None
    """Tenant key for the prefix cache (no cross-tenant hits). ``patch`` also takes a callable
    ``(input_ids, call_kwargs) -> str`` evaluated per call."""
    kv_quant: str | None = None
    """``None``, ``"int8"`` or ``"int4"``: a quantized KV cache for the target."""
    compile: bool | str = False
    """``True``/``"graphs"``: static KV cache + CUDA graphs (warm-up once per model and shape family);
    ``"inductor"``: also torch.compile-fused kernels (a compile of minutes, once per model)."""
    generator: torch.Generator | None = None
    """A ``torch.Generator`` for reproducible sampling (with a fixed ``num_draft_tokens``)."""
    return_stats: bool = False
    """Also return a ``GenerationStats`` (a tuple ``(output, stats)``)."""


OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(Options))


def check(options: Options, *, namespace_callable: bool = False) -> Options:
    """Raise TypeError/ValueError for any option that is wrong on its own (no model needed).

    ``namespace_callable``: accept a callable ``cache_namespace`` (``patch`` evaluates it per call).
    Returns ``options`` unchanged.
    """
    check_drafting(options.draft_model, options.num_draft_tokens, options.prompt_lookup_num_tokens)
    check_cache(options.prefix_cache, options.cache_namespace, namespace_callable)
    check_kv_quant(options.kv_quant)
    compile_mode(options.compile)
    check_generator(options.generator)
    if not isinstance(options.return_stats, bool):
        raise TypeError(f"return_stats must be True or False, got {options.return_stats!r}")
    return options


def from_keywords(where: str, keywords: dict, **fixed) -> Options:
    """``Options`` from keyword arguments; an unknown name raises TypeError as Python would."""
    unknown = sorted(set(keywords) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r} (specdec's options: "
                        f"{', '.join(OPTIONS)})")
    return Options(**keywords, **fixed)


def check_drafting(draft_model, num_draft_tokens, lookup_tokens) -> int:
    """Check the drafter choice; returns the largest k a step may draft (0 without a drafter)."""
    if draft_model is not None and lookup_tokens is not None:
        raise ValueError("pass either draft_model= or prompt_lookup_num_tokens=, not both")
    if draft_model is not None and not isinstance(draft_model, (str, torch.nn.Module)):
        raise TypeError(f"draft_model must be a causal LM or 'self:N' (or 'distilled'), got "
                        f"{type(draft_model).__name__}; load it with AutoModelForCausalLM.from_pretrained")
    if isinstance(draft_model, str):
        parse_self_draft(draft_model)
    if lookup_tokens is not None and (isinstance(lookup_tokens, bool) or not isinstance(lookup_tokens, int)
                                      or lookup_tokens < 1):
        raise ValueError(f"prompt_lookup_num_tokens must be an int >= 1, got {lookup_tokens!r}")
    if num_draft_tokens != "auto" and (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int)
                                       or num_draft_tokens < 1):
        raise ValueError(f"num_draft_tokens must be an int >= 1 or 'auto', got {num_draft_tokens!r}")
    return max_draft_tokens(num_draft_tokens, lookup_tokens)


def max_draft_tokens(num_draft_tokens, lookup_tokens) -> int:
    """The largest k a step may draft: the fixed k, the lookup cap, or the auto controller's cap."""
    if num_draft_tokens != "auto":
        return int(num_draft_tokens)
    return lookup_tokens or AUTO_MAX_DRAFT


AUTO_MAX_DRAFT = 12   # auto k's ceiling for model drafts; a confident draft keeps drafting up to it


def parse_self_draft(name: str) -> int | None:
    """N for ``"self:N"``, None for a distilled name; ValueError for any other string."""
    if name in DISTILLED_NAMES:
        return None
    if name.startswith("self:") and name[5:].isdigit():
        return int(name[5:])
    raise ValueError(f"draft_model={name!r}: a string must be 'self:N' (the target's first N layers), "
                     "'distilled' (the best draft shipped for the bundled default model), "
                     "'distilled-feature' or 'distilled-layers' (one kind of it)")


def check_cache(prefix_cache, namespace, namespace_callable: bool = False) -> None:
    if prefix_cache is not None and not (callable(getattr(prefix_cache, "match", None))
                                         and callable(getattr(prefix_cache, "insert", None))):
        raise TypeError(f"prefix_cache must be a prefix_cache.PrefixCache, got {type(prefix_cache).__name__}")
    if namespace is None or isinstance(namespace, str):
        return
    if namespace_callable and callable(namespace):
        return
    if namespace_callable:
        raise TypeError("cache_namespace must be a string or a callable (input_ids, kwargs) -> str")
    raise TypeError(f"cache_namespace must be a str (a tenant key) or None, got {type(namespace).__name__}")


def check_kv_quant(kv_quant) -> None:
    if kv_quant not in KV_QUANT_MODES or isinstance(kv_quant, bool):
        raise ValueError(f"kv_quant must be None, 'int8' or 'int4', got {kv_quant!r}")


def compile_mode(compile) -> str | None:
    """None (eager), ``"graphs"`` or ``"inductor"``."""
    if compile is None or compile is False:
        return None
    if compile is True or compile == "graphs":
        return "graphs"
    if compile == "inductor":
        return "inductor"
    raise ValueError(f"compile must be False, True, 'graphs' or 'inductor', got {compile!r}")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}; "
                        "for a seed pass torch.Generator().manual_seed(seed)")


def check_streamer(streamer) -> None:
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put(token_ids) and end() (an HF TextStreamer / "
                        f"TextIteratorStreamer), got {type(streamer).__name__}")


def resolve_draft(draft, target: torch.nn.Module):
    """The draft module for ``draft`` (any form ``Options.draft_model`` takes), checked against the
    target: loads a shipped distilled draft, builds ``"self:N"`` (cached per target), refuses a
    draft whose vocabulary is smaller than the target's."""
    from specdec.feature_draft import FeatureDraft

    if draft is None:
        return None
    if isinstance(draft, str):
        layers = parse_self_draft(draft)
        if layers is None:
            from specdec.distill.shipped import load_named

            return load_named(target, draft)
        from specdec.drafters import cached_early_exit_model

        return cached_early_exit_model(target, layers)
    if isinstance(draft, FeatureDraft):
        if not draft.fits(target):
            raise ValueError("this FeatureDraft was built around another target model's embeddings and head: "
                             "load it for this target (specdec.distill.load_feature_draft(target, path))")
        return draft
    if not (isinstance(draft, torch.nn.Module) and callable(getattr(draft, "get_input_embeddings", None))):
        raise TypeError(f"draft_model must be a causal LM sharing the target's tokenizer, or 'self:N', got "
                        f"{type(draft).__name__}; load it with AutoModelForCausalLM.from_pretrained")
    target_vocab = target.get_output_embeddings().weight.shape[0]
    draft_vocab = draft.get_input_embeddings().weight.shape[0]
    if draft_vocab < target_vocab:
        raise ValueError(f"the draft's vocabulary ({draft_vocab}) is smaller than the target's ({target_vocab}): "
                         "draft and target must share a tokenizer; pick a draft of the same model family")
    return draft
