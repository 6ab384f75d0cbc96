"""Cross-attention processors: one that keeps its fast SDPA output and also reports pooled
pre-softmax logits, and one that projects a context shared by the whole batch only once.

GenzIQA and GenzVQA read, in every cross-attention layer of the U-Net, the logits
``s = q·kᵀ/√d`` (batch, heads, positions, tokens) pooled over the spatial positions by a
temperature log-sum-exp, ``logsumexp(λ·s, positions) / λ`` (λ = 0.14 in the released code),
and the spatial mean of the layer's query features. The released code got them by computing
the attention output the slow way (explicit softmax). Here the attention output still comes
from ``F.scaled_dot_product_attention``, exactly as diffusers' ``AttnProcessor2_0`` computes
it, and the pooled logits come from one extra ``q·kᵀ`` matmul beside it; no softmax is
materialised for the output.

The processor calls ``attn.to_q`` / ``attn.to_k`` / ``attn.to_v`` / ``attn.to_out[0]`` as
modules, so LoRA layers that peft wraps around them take part transparently.

:class:`SharedContextAttnProcessor`: where every image of a batch attends to the same context
(DP-IQA's 1485 prompt tokens, LGDM's empty prompt), that context's keys and values do not depend
on the image. Given the context as a batch-expanded view (stride 0 on the batch), the processor
projects one row and reuses the result for every row and every later batch, until the context or
the projection weights change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "CrossAttentionRecorder",
    "SharedContextAttnProcessor",
    "install_shared_context_processors",
    "PooledLogitAttnProcessor",
    "cross_attention_layer_names",
    "install_pooled_logit_processors",
    "pooled_logits",
    "scaled_logits",
]


def scaled_logits(query: torch.Tensor, key: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """(B, heads, N, d) queries and (B, heads, M, d) keys -> (B, heads, N, M) float32 logits
    ``q·kᵀ/√d`` (plus ``attention_mask``, the additive bias SDPA got)."""
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        logits = logits + attention_mask.float()
    return logits


def pooled_logits(query: torch.Tensor, key: torch.Tensor, temperature: float, attention_mask=None) -> torch.Tensor:
    """(B, heads, N, d) queries and (B, heads, M, d) keys -> (B, heads, M): the scaled dot-product
    logits pooled over the N query positions by ``logsumexp(temperature·s) / temperature``.

    Computed in float32 whatever the U-Net's dtype, since the sum runs over up to 4096
    positions (SD at 512 px). ``attention_mask`` is the additive bias SDPA got."""
    logits = scaled_logits(query, key, attention_mask)
    return torch.logsumexp(temperature * logits, dim=-2) / temperature


def _flatten_spatial(hidden_states: torch.Tensor):
    """(B, C, H, W) -> (B, H·W, C) and (C, H, W) to restore it; (B, N, C) passes with None."""
    if hidden_states.ndim != 4:
        return hidden_states, None
    batch_size, channel, height, width = hidden_states.shape
    return hidden_states.view(batch_size, channel, height * width).transpose(1, 2), (channel, height, width)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) -> (B, heads, N, d)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _attend(attn, query, key, value, attention_mask, residual, spatial) -> torch.Tensor:
    """``AttnProcessor2_0``'s ending on split heads: fused attention, heads merged, the output
    projection, the spatial shape restored (``spatial`` from :func:`_flatten_spatial`), the
    residual and the rescale."""
    batch_size, heads, _, head_dim = query.shape
    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if spatial is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, *spatial)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class CrossAttentionRecorder:
    """What the pooled-logit processors report during one U-Net call, by layer name.

    Recording is on only inside ``with recorder:``, so a U-Net call outside it costs nothing
    extra and leaves no tensors behind; entering clears what an earlier call left."""

    def __init__(self):
        self.active = False
        self.pooled: dict[str, torch.Tensor] = {}  # name -> (B, heads, tokens)
        self.query_means: dict[str, torch.Tensor] = {}  # name -> (B, channels)

    def clear(self) -> None:
        self.pooled.clear()
        self.query_means.clear()

    def __enter__(self) -> CrossAttentionRecorder:
        self.clear()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        if exc[0] is not None:
            self.clear()


class PooledLogitAttnProcessor:
    """``AttnProcessor2_0``'s computation, plus (while its recorder is active) the layer's pooled
    logits and spatial-mean query features written to ``recorder`` under ``name``."""

    def __init__(self, name: str, recorder: CrossAttentionRecorder, temperature: float):
        self.name = name
        self.recorder = recorder
        self.temperature = float(temperature)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        hidden_states, spatial = _flatten_spatial(hidden_states)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        recording = self.recorder.active
        if recording:
            # The released code averages the query after its LoRA and before the head split.
            self.recorder.query_means[self.name] = query.mean(dim=1)

        query, key, value = (_split_heads(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if recording:
            self.recorder.pooled[self.name] = pooled_logits(query, key, self.temperature, attention_mask)
        return _attend(attn, query, key, value, attention_mask, residual, spatial)


def cross_attention_layer_names(unet) -> list[str]:
    """Module names of the U-Net's cross-attention layers (``attn2`` of every transformer block),
    in the order the U-Net runs them: down blocks, mid block, up blocks."""
    from diffusers.models.attention_processor import Attention

    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2" and module.is_cross_attention
    ]
    # named_modules() follows registration order, which in diffusers puts up_blocks before the
    # mid block; a stable sort on the stage restores execution order.
    return sorted(names, key=lambda name: stage.get(name.split(".", 1)[0], len(stage)))


def install_pooled_logit_processors(unet, names, recorder: CrossAttentionRecorder, temperature: float) -> None:
    """Give each named cross-attention layer a :class:`PooledLogitAttnProcessor`; other layers
    (self-attention) keep theirs."""
    modules = dict(unet.named_modules())
    for name in names:
        modules[name].set_processor(PooledLogitAttnProcessor(name, recorder, temperature))


class SharedContextAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a cross-attention layer, except that the keys and values
    of a context shared by the whole batch are computed once and kept.

    The shared path is taken only where its result is the default one's: no attention mask, no
    spatial, group, cross or key norms, the context a batch-expanded view (stride 0 on the batch,
    or a batch of one), and no gradient wanted through the projections or the context (training
    recomputes them every call). Anything else goes to ``AttnProcessor2_0`` itself.

    The cache holds the context tensor it was computed from (so its memory cannot be reused by
    another tensor while the key matches) and is keyed on its storage, shape, dtype and version
    counter and on every projection parameter's storage and version: an in-place update of either
    (an optimiser step, a checkpoint load) recomputes. Memory: one key and one value row per
    layer, e.g. 148 MB for DP-IQA's 1485 tokens over SD 1.5's 16 layers in float32."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._default = AttnProcessor2_0()
        self._cache: tuple | None = None  # (key, context, keys (1, heads, M, d), values)

    def __deepcopy__(self, memo):
        # A copied U-Net (a method's own, fine-tuned) starts with an empty cache of its own.
        return type(self)()

    @staticmethod
    def _shared(attn, encoder_hidden_states, attention_mask) -> bool:
        context = encoder_hidden_states
        if context is None or context.ndim != 3 or attention_mask is not None:
            return False
        if any(m is not None for m in (attn.spatial_norm, attn.group_norm, attn.norm_q, attn.norm_k)) or attn.norm_cross:
            return False
        if context.shape[0] > 1 and context.stride(0) != 0:
            return False
        if torch.is_grad_enabled():
            projections = (*attn.to_k.parameters(), *attn.to_v.parameters())
            if context.requires_grad or any(p.requires_grad for p in projections):
                return False
        return True

    def _keys_values(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = (*attn.to_k.parameters(), *attn.to_v.parameters())
        key = (
            context.untyped_storage().data_ptr(), context.storage_offset(), tuple(context.shape[1:]),
            tuple(context.stride()[1:]), context.dtype, context.device, _version(context),
            tuple((p.data_ptr(), _version(p)) for p in params),
        )
        if self._cache is None or self._cache[0] != key:
            one = context[:1]
            # Ordinary tensors even under inference mode: a later pass with gradients (enhancement
            # climbs the score) may save them for its backward pass.
            with torch.inference_mode(False), torch.no_grad():
                keys, values = attn.to_k(one), attn.to_v(one)
            self._cache = (key, context, _split_heads(keys, attn.heads), _split_heads(values, attn.heads))
        return self._cache[2], self._cache[3]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self._shared(attn, encoder_hidden_states, attention_mask):
            return self._default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        hidden_states, spatial = _flatten_spatial(hidden_states)
        batch_size = hidden_states.shape[0]
        keys, values = self._keys_values(attn, encoder_hidden_states)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        keys = keys.expand(batch_size, -1, -1, -1)
        values = values.expand(batch_size, -1, -1, -1)
        return _attend(attn, query, keys, values, None, residual, spatial)


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter; inference tensors have none (nothing outside inference mode
    may change them in place)."""
    return -1 if tensor.is_inference() else tensor._version


def install_shared_context_processors(unet) -> None:
    """Give every cross-attention layer of ``unet`` a :class:`SharedContextAttnProcessor` (results
    unchanged; a batch-shared context is projected once)."""
    modules = dict(unet.named_modules())
    for name in cross_attention_layer_names(unet):
        modules[name].set_processor(SharedContextAttnProcessor())
