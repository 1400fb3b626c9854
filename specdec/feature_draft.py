"""EAGLE-style feature drafts (Li et al. 2024): one decoder layer that reads the target's features.

A *feature* is what the target's head reads: its final norm applied to the output of its
last decoder layer (``hidden_states[-1]`` in HF). The draft predicts the next slot's feature
from the current token and the previous slot's feature::

    x_s  = fc([embed(token_s), f_{s-1}])               # Linear(2H -> H), embed = the target's
    r_s  = one pre-norm layer(x_s)                     # RMSNorm, GQA attention + RoPE, SwiGLU
    f̂_s = target.final_norm(r_s)                      # logits_s = target.lm_head(f̂_s)

Drafting k tokens: step 1 uses the target's true feature of the last verified slot, steps
2..k the draft's own f̂. Its KV cache (:class:`FeatureCache`) keeps only slots computed from
true features; the slots drafted on predicted ones are recomputed from the target's features
by the next proposal's first forward (no extra forward per step).

Pure torch, any HF decoder-only LM whose decoder layers sit in one ``ModuleList`` and whose
final norm is the last 1-D-parameter module outside it (Llama, Qwen2, Mistral, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specdec.drafters import Chooser, KeepDrafting, Proposal, top_probability
from specdec.layers import find_layer_list
from specdec.state import SlotBatch, positions_from_mask


@dataclass(frozen=True)
class FeatureDraftConfig:
    hidden_size: int            # H: the target's hidden size (feature width)
    num_heads: int              # query heads of the draft's attention
    num_kv_heads: int           # key/value heads (grouped-query attention)
    head_dim: int               # width of one head
    intermediate_size: int      # SwiGLU width
    rope_theta: float = 10000.0  # RoPE base (the target's)
    rms_eps: float = 1e-6       # RMSNorm epsilon

    @classmethod
    def from_target(cls, target: nn.Module, intermediate_size: int | None = None) -> "FeatureDraftConfig":
        """The target's attention shape, RoPE base and (default) MLP width."""
        c = target.config.get_text_config()
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        return cls(hidden_size=c.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate_size=intermediate_size or c.intermediate_size, rope_theta=float(theta),
                   rms_eps=float(getattr(c, "rms_norm_eps", 1e-6)))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TargetParts:
    """The target's modules a feature draft uses, shared and frozen (not the draft's parameters)."""

    embed: nn.Module       # token ids -> (.., H)
    final_norm: nn.Module  # last-layer output -> feature
    head: nn.Module        # feature -> logits
    last_layer: nn.Module  # the decoder layer whose output is hooked


def target_parts(target: nn.Module) -> TargetParts:
    """Find embeddings, final norm, head and last decoder layer of an HF causal LM."""
    path, layers = find_layer_list(target)
    head = target.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(target).__name__} has no output embeddings (LM head): a feature draft needs one")
    return TargetParts(target.get_input_embeddings(), _final_norm(target, ".".join(path), head), head, layers[-1])


def _final_norm(target: nn.Module, layer_path: str, head: nn.Module) -> nn.Module:
    """The last module outside the layer list (and the head) whose own parameters are all 1-D."""
    found = None
    for name, module in target.named_modules():
        if name == layer_path or name.startswith(layer_path + ".") or module is head:
            continue
        params = list(module.parameters(recurse=False))
        if params and all(p.dim() == 1 for p in params):
            found = module
    if found is None:
        raise ValueError(f"cannot find the final norm of {type(target).__name__} (a module with only 1-D "
                         "parameters outside the decoder layers): feature drafts need one")
    return found


class FeatureDraft(nn.Module):
    """fc + one decoder layer; the target's embeddings, final norm and head are borrowed, not owned."""

    supports_compile = True  # compile=True: the static runner hands out features too (not "inductor")

    def __init__(self, config: FeatureDraftConfig, target: nn.Module):
        super().__init__()
        parts = target_parts(target)
        width = parts.embed.weight.shape[1]
        if width != config.hidden_size:
            raise ValueError(f"feature draft hidden size {config.hidden_size} != the target's {width}: "
                             "this draft was made for another model; make one with `specdec distill --kind feature`")
        H, c = config.hidden_size, config
        self.config = config
        self.fc = nn.Linear(2 * H, H)
        self.attn_norm, self.mlp_norm = nn.RMSNorm(H, eps=c.rms_eps), nn.RMSNorm(H, eps=c.rms_eps)
        self.q_proj = nn.Linear(H, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(H, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(H, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, H, bias=False)
        self.gate_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, H, bias=False)
        self.__dict__["parts"] = parts  # plain attribute: not registered, not in state_dict()
        emb = parts.embed.weight
        self.to(device=emb.device, dtype=emb.dtype if emb.dtype.is_floating_point else torch.float32)

    def fits(self, target: nn.Module) -> bool:
        """Built around this target's own modules."""
        return self.parts.embed is target.get_input_embeddings()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(.., H) last-layer outputs -> features (the target's final norm)."""
        return self.parts.final_norm(hidden)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(.., H) features -> (.., V) logits (the target's head)."""
        head = self.parts.head
        return head(features.to(head.weight.dtype))

    def forward(self, tokens: torch.Tensor, prev_features: torch.Tensor, positions: torch.Tensor,
                allowed: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: "FeatureCache | None" = None):
        """Predicted features (B, n, H) and this call's own (keys, values).

        tokens (B, n) at ``positions`` (B, n); prev_features (B, n, H): the feature before each
        token; allowed (B, n, m) bool: which of the m keys (``past`` or ``cache`` slots, then these
        n) each query may read.
        """
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.parts.embed(tokens).to(dtype), prev_features.to(dtype)], dim=-1))
        attn, own = self._attention(self.attn_norm(x), positions, allowed, past, cache)
        x = x + attn
        h = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.features(x), own

    def _attention(self, x, positions, allowed, past, cache):
        B, n, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(B, n, c.num_heads, c.head_dim).transpose(1, 2)       # (B, nh, n, hd)
        k = self.k_proj(x).view(B, n, c.num_kv_heads, c.head_dim).transpose(1, 2)    # (B, kvh, n, hd)
        v = self.v_proj(x).view(B, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        own = (k, v)
        if cache is not None:
            k, v = cache.append(k, v)
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, m, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])     # (B, nh, n, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1)), own


# draft module -> name of the module in an HF Llama-family decoder layer it starts as
_FROM_LAYER = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
               "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
               "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


@torch.no_grad()
def init_from_last_layer(draft: FeatureDraft, feature_scale: float = 1.0) -> list[str]:
    """Start the draft's layer as a copy of the target's last decoder layer, and fc's feature half as
    ``feature_scale`` * identity (the layer then first sees the previous feature at the residual
    stream's scale). Modules are matched by name and shape; what does not match stays random.
    Returns the names of the draft modules copied."""
    source = {name.rsplit(".", 1)[-1]: m for name, m in draft.parts.last_layer.named_modules() if name}
    copied = []
    for ours, theirs in _FROM_LAYER.items():
        src, dst = source.get(theirs), getattr(draft, ours)
        if src is not None and getattr(src, "weight", None) is not None and src.weight.shape == dst.weight.shape:
            dst.weight.copy_(src.weight)
            copied.append(ours)
    H = draft.config.hidden_size
    draft.fc.weight[:, H:] = feature_scale * torch.eye(H, dtype=draft.fc.weight.dtype, device=draft.fc.weight.device)
    draft.fc.bias.zero_()
    return copied


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (HF Llama's rotate-half layout): x (B, h, n, d), positions (B, n)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[..., None] * inv_freq           # (B, n, d/2)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1)[:, None] for f in (torch.cos, torch.sin))
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


def slot_allowed(key_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, m) bool for the last n of m slots as queries: real earlier-or-same keys, and itself.

    The diagonal is always allowed, so padding and hole queries never see an empty row (NaN).
    """
    m = key_mask.shape[1]
    keys = torch.arange(m, device=key_mask.device)
    queries = torch.arange(m - n, m, device=key_mask.device)[:, None]
    return (key_mask.bool()[:, None, :] & (keys <= queries)) | (keys == queries)


def previous_features(features: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, n, H): at slot i, the feature of the row's latest real slot before i (zeros if none).

    features (B, n, H) and real (B, n) bool describe the same n slots.
    """
    B, n, H = features.shape
    index = torch.arange(n, device=features.device).expand(B, n)
    latest = torch.where(real.bool(), index, -1).cummax(dim=1).values                # (B, n)
    before = torch.cat([latest.new_full((B, 1), -1), latest[:, :-1]], dim=1)
    picked = features.gather(1, before.clamp(min=0)[..., None].expand(B, n, H))
    return torch.where((before >= 0)[..., None], picked, torch.zeros_like(picked))


class FeatureCache:
    """The draft layer's keys/values, preallocated (capacity doubles); slots [0, length) valid.

    Cropping lowers ``length``: what lies past it is overwritten by the next append.
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None    # (B, kvh, capacity, hd)
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kvh, n, hd) at the next n slots; return all valid slots."""
        end = self.length + k.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(k, 2 * end)
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        B, h, _, d = like.shape
        keys, values = like.new_zeros(B, h, capacity, d), like.new_zeros(B, h, capacity, d)
        if self.keys is not None:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values

    def crop(self, length: int) -> None:
        self.length = max(0, min(self.length, length))

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


class FeatureDrafter:
    """Drafts with a :class:`FeatureDraft`, mirroring the target's slot layout (holes included).

    The loop hands it the target's last-layer outputs of every newly cached slot
    (``observe``; ``wants_features``); ``propose`` first catches its cache up on the slots
    verified since, with true features, then drafts autoregressively on its own.
    """

    name = "feature"
    wants_features = True
    reusable_cache = False    # its cache holds features of the target, which a prefix cache does not keep

    def __init__(self, draft: FeatureDraft, target_vocab: int):
        self.draft = draft
        self.target_vocab = target_vocab
        self.cache = FeatureCache()
        self.window: torch.Tensor | None = None  # (B, m, H) features of target slots [window_from, ...)
        self.window_from = 0
        self.true_length = 0                     # draft slots computed from true features

    @property
    def _device(self) -> torch.device:
        return self.draft.fc.weight.device

    def observe(self, hidden: torch.Tensor) -> None:
        """(B, n, H) the target's last-layer outputs at its n newest slots."""
        with torch.inference_mode():
            feats = self.draft.features(hidden.to(self._device))
        self.window = feats if self.window is None else torch.cat([self.window, feats], dim=1)

    @torch.inference_mode()
    def propose(self, batch: SlotBatch, k: int, choose: Chooser,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        """Up to k tokens per row; with ``keep_drafting``, stop once it says so (one host sync a token)."""
        start, device = self.cache.length, self._device
        mask = batch.key_mask(1).to(device)
        tokens = torch.cat([batch.slot_tokens[:, start:], batch.pending[:, None]], dim=1).to(device)
        positions = positions_from_mask(mask)[:, start:]
        prev = self._previous(mask, start)
        drafted, probs, confidence = [], [], []
        for j in range(k):
            f_hat, _ = self.draft(tokens, prev, positions, slot_allowed(mask, tokens.shape[1]), cache=self.cache)
            logits = self.draft.logits(f_hat[:, -1])[:, : self.target_vocab]
            token, prob = choose(logits, j)
            drafted.append(token)
            probs.append(prob)
            if j == 0:
                self._forget_window(batch.num_slots)
            tokens, prev, positions = token[:, None], f_hat[:, -1:], positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(batch.size, 1)], dim=1)
            if keep_drafting is not None:
                confidence.append(top_probability(logits, prob).cpu())
                if j + 1 < k and not keep_drafting(torch.stack(confidence, 1)):
                    break
        stacked = torch.stack(probs, 1) if probs and probs[0] is not None else None
        out = torch.stack(drafted, 1) if drafted else batch.pending.new_zeros(batch.size, 0)
        n = out.shape[1]
        return Proposal(out, stacked, torch.full((batch.size,), n, device=out.device), None,
                        torch.stack(confidence, 1) if confidence else None, forwards=n)

    def _previous(self, mask: torch.Tensor, start: int) -> torch.Tensor:
        """(B, S + 1 - start, H): the feature before each slot start..S (S = the pending token's slot)."""
        slots = mask.shape[1] - 1
        if self.window is None or self.window_from + self.window.shape[1] != slots:
            raise RuntimeError("FeatureDrafter.propose needs the target's features of every cached slot: "
                               "call observe() after each target forward")
        lo = max(start - 1, 0)
        window = self.window[:, lo - self.window_from:]                           # slots lo .. S-1
        real = mask[:, lo:slots].bool()
        if start == 0:  # nothing before slot 0: a zero feature, like a row's first token in training
            window = torch.cat([torch.zeros_like(window[:, :1]), window], dim=1)
            real = torch.cat([real.new_zeros(real.shape[0], 1), real], dim=1)
        window = torch.cat([window, torch.zeros_like(window[:, :1])], dim=1)     # + the pending slot
        real = torch.cat([real, real.new_ones(real.shape[0], 1)], dim=1)
        return previous_features(window, real)[:, 1:]

    def _forget_window(self, pending_slot: int) -> None:
        """After the true-feature forward: keep features from the pending slot on (the next catch-up's)."""
        self.true_length = self.cache.length
        self.window = self.window[:, pending_slot - self.window_from:]
        self.window_from = pending_slot

    def lag(self, batch: SlotBatch) -> int:
        """Slots to catch up on: one layer, cheap, and timed as drafting (no catch-up price)."""
        return max(batch.num_slots - self.cache.length, 0)

    def rollback(self, num_slots: int) -> None:
        """Keep only slots computed from the target's true features (and within the target's ``num_slots``)."""
        self.cache.crop(min(self.true_length, num_slots))

    def select_rows(self, keep: torch.Tensor) -> None:
        keep = keep.to(self._device)
        self.cache.select_rows(keep)
        if self.window is not None:
            self.window = self.window[keep]
