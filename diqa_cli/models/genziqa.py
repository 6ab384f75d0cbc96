"""GenzIQA (Mitra, De, Rao, Soundararajan; arXiv 2406.04654, TMLR) on a diqa backbone.

How an image is scored (as the released code sh-r/GenzIVQA does it):

1. Pixels in [0, 1] are CLIP mean/std normalised and VAE-encoded (posterior mean × scaling).
2. At each of the 8 timesteps t ∈ {9, 21, …, 93}, x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε_t.
3. The U-Net denoises x_t twice: with the context of "X×16 Good Photo." and of "X×16 Bad Photo.",
   the 16 X embeddings replaced by learnable context vectors shared by both prompts, passed
   through the frozen text encoder (full 77-token last hidden state). Rank-4 LoRA sits on the
   cross-attention projections only. All 16 evaluations of an image run batched.
4. In every cross-attention layer l the logits q·kᵀ/√d are pooled over the spatial positions by
   logsumexp(0.14·s)/0.14; the layer's attention term is the mean of the pooled values over
   heads, the 77 tokens and both prompt rows (the released code averages the two prompts; it
   does not take their difference).
5. Layer score = attention term + ‖ε − ε̂(good)‖₂ − ‖ε − ε̂(bad)‖₂ (the denoising-error
   difference, the released ``use_bias`` term; ε̂(good) is the first of the pair).
6. Image score = mean over layers and timesteps. There is no head: what is learned is the LoRA
   and the context vectors, trained by MSE against MOS at random t ∈ [0, 100) with fresh noise.

Quality map (``diqa score --maps``; not in the paper): the generic detail map (gradient of the score
times the image minus its blur) integrated along the straight path from the blurred image to the
image in 8 steps, so its mean is score(x) − score(blurred x) up to the 8-step sum. GenzIQA's score
is a small difference of large terms (the two prompts' denoising errors; logits pooled over both
prompts), so a single gradient, or a split of the score by its own terms per latent position,
swung with rounding on the patch test (4 to 7 of 8 cases); the path average did not.

Where diqa departs from the released code (each also in the method spec):

* VAE posterior mean instead of a sample.
* Noise bank drawn from the recorded seed, one tensor per timestep shaped to the latent
  (released: unseeded randn(1000, 4, 64, 64) pickled under ~/diffusers).
* No random flips at test time.
* Layer scores stay per image inside a batch (released: one mean over the whole U-Net batch,
  which equals the per-image value at its test batch size of 1).
* No LoRA on self-attention (released: attached but frozen at zero, so outputs are the same).
* LoRA through peft rather than diffusers 0.17's LoRACrossAttnProcessor (same initialisation).

The model's U-Net is a copy of the backbone's module tree that shares every weight tensor with
it: peft's LoRA layers and the pooled-logit processors go into the copy, so the backbone (and
any other model on it) is left as it was, at no extra weight memory.

Checkpoint names follow the released files: ``ctx`` (as in ``coop_Model_state_dict.pth``; the
token buffers are rebuilt from the tokenizer) and, per cross-attention layer,
``<layer>.processor.to_{q,k,v,out}_lora.{down,up}.weight`` (diffusers 0.17 ``save_attn_procs``;
``down`` is peft's ``lora_A``, ``up`` its ``lora_B``). A released ``pytorch_model.bin`` also holds
``attn1`` entries; they are frozen zeros in effect and are dropped on conversion.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.methods.genziqa import GENZIQA_TIMESTEPS
from diqa_cli.models.base import QualityModel
from diqa_cli.models.xattn import CrossAttentionRecorder, cross_attention_layer_names, install_pooled_logit_processors

__all__ = ["GenzIQA", "MAP_STEPS"]

# OpenAI CLIP's normalisation, which the released data loaders apply before the VAE.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Training draws t uniformly from [0, 100), the released range (the low-noise end of the schedule).
_TRAIN_TIMESTEPS = 100
_ADAPTER = "genziqa"
# peft module suffix -> released processor attribute.
_LORA_TARGETS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_LORA_MATRICES = {"lora_A": "down", "lora_B": "up"}
# Gradient evaluations along the path of the quality map (GenzVQA's frame maps too).
MAP_STEPS = 8


def _weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s module tree whose parameters and buffers are the original
    tensors: adapters and processors installed in the copy leave the original untouched."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


class GenzIQA(QualityModel):
    """GenzIQA quality model: see the module docstring for the computation and the departures
    from the released code. Config: ``timesteps`` (scoring), ``prompts`` (the two class texts,
    good first), ``context_tokens``, ``lora_rank``, ``lse_temperature``, ``unet_batch`` (U-Net
    rows per call, the two prompts of a pair always together), ``seed`` (noise bank, context and
    LoRA initialisation), ``resolution``."""

    method_name = "genziqa"

    def __init__(
        self,
        backbone,
        *,
        timesteps=GENZIQA_TIMESTEPS,
        prompts=("Good Photo.", "Bad Photo."),
        context_tokens: int = 16,
        lora_rank: int = 4,
        lse_temperature: float = 0.14,
        unet_batch: int = 16,
        seed: int = 0,
        resolution: int | None = None,
    ):
        super().__init__(
            backbone,
            timesteps=[int(t) for t in timesteps],
            prompts=[str(p) for p in prompts],
            context_tokens=int(context_tokens),
            lora_rank=int(lora_rank),
            lse_temperature=float(lse_temperature),
            unet_batch=int(unet_batch),
            seed=int(seed),
            resolution=resolution,
        )
        self._check_config()
        from peft import LoraConfig

        self.unet = _weight_sharing_copy(backbone.unet)
        self._layers = cross_attention_layer_names(self.unet)
        if not self._layers:
            raise UsageError(
                f"backbone {backbone.ref!r} has a U-Net without cross-attention; GenzIQA needs a text-conditioned U-Net"
            )
        targets = [f"{layer}.{suffix}" for layer in self._layers for suffix in _LORA_TARGETS]
        rank = self.config["lora_rank"]
        # peft initialises LoRA from the global generator; fork it so a fresh head is reproducible.
        cuda = [backbone.device] if backbone.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.config["seed"])
            self.unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets),
                adapter_name=_ADAPTER,
            )
        # Trainable parts stay float32 whatever the backbone's dtype (peft casts inputs to them).
        for name, param in self.unet.named_parameters():
            if f".{_ADAPTER}." in name:
                param.data = param.data.float()
        self._recorder = CrossAttentionRecorder()
        install_pooled_logit_processors(self.unet, self._layers, self._recorder, self.config["lse_temperature"])

        tokenizer, text_encoder = backbone.text_encoder()
        ids, mask = self._prompt_tokens(tokenizer, text_encoder.config.max_position_embeddings)
        self.register_buffer("prompt_ids", ids.to(backbone.device), persistent=False)
        self.register_buffer("prompt_mask", mask.to(backbone.device), persistent=False)
        generator = torch.Generator().manual_seed(self.config["seed"])
        width = text_encoder.config.hidden_size
        ctx = torch.randn(self.config["context_tokens"], width, generator=generator) * 0.02
        self.ctx = nn.Parameter(ctx.to(backbone.device))

        self._context_cache: tuple | None = None  # (key, (2, 77, D) tensor) for eval mode
        self._bank_cache: tuple | None = None  # ((count, latent shape, device), (T, C, h, w) noise)

    def _check_config(self) -> None:
        config = self.config
        if len(config["prompts"]) != 2:
            raise UsageError(f"GenzIQA takes exactly two prompts (good, bad), got {config['prompts']!r}")
        steps = len(self.backbone.alphas_cumprod)
        bad = [t for t in config["timesteps"] if not 0 <= t < steps]
        if bad or not config["timesteps"]:
            raise UsageError(f"GenzIQA timesteps must be a non-empty list in [0, {steps}), got {config['timesteps']!r}")
        if config["unet_batch"] < 2:
            raise UsageError(f"unet_batch must be at least 2 (one image with both prompts), got {config['unet_batch']}")

    # --- prompts -----------------------------------------------------------------------------
    def _prompt_tokens(self, tokenizer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and padding mask of "<context×n> <prompt>" for both prompts, (2, length).

        The context slots sit right after the start token, as "X X … X" does in the released
        prompt; their ids only stand in (the token embeddings there are replaced by ``ctx``)."""
        n = self.config["context_tokens"]
        encoded = tokenizer(
            self.config["prompts"], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if int(mask.sum(dim=1).max()) + n > length:
            raise UsageError(
                f"prompts {self.config['prompts']!r} plus {n} context tokens do not fit in {length} tokens"
            )
        x_id = tokenizer("X", add_special_tokens=False)["input_ids"][0]
        slots = torch.full((2, n), x_id, dtype=ids.dtype)
        ids = torch.cat([ids[:, :1], slots, ids[:, 1 : length - n]], dim=1)
        mask = torch.cat([mask[:, :1], torch.ones_like(slots), mask[:, 1 : length - n]], dim=1)
        return ids, mask

    def _encode_prompts(self) -> torch.Tensor:
        """(2, 77, D) last hidden states of both prompts with ``ctx`` spliced into the token
        embeddings; differentiable with respect to ``ctx``."""
        _, text_encoder = self.backbone.text_encoder()
        n = self.config["context_tokens"]

        def splice(module, args, output):
            ctx = self.ctx.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :1], ctx, output[:, 1 + n :]], dim=1)

        # CLIPTextModel.forward takes only token ids; a hook on its input embedding layer swaps
        # the context in and leaves the rest (positions, causal + padding mask, final norm) to it.
        # The padding mask is passed as the released prompt learner does (SD pipelines pass none).
        handle = text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            hidden = text_encoder(input_ids=self.prompt_ids, attention_mask=self.prompt_mask).last_hidden_state
        finally:
            handle.remove()
        return hidden.to(self.backbone.device, self.backbone.dtype)

    def _prompt_context(self) -> torch.Tensor:
        """The prompt context: recomputed every call while training, cached in eval mode until
        ``ctx`` changes (an optimizer step or a checkpoint load bumps its version)."""
        if self.training:
            return self._encode_prompts()
        key = (self.ctx._version, self.ctx.data_ptr(), self.ctx.device)
        if self._context_cache is None or self._context_cache[0] != key:
            # Built outside any inference_mode so the cached tensor can join a later autograd
            # graph (enhancement differentiates scores with respect to the pixels).
            with torch.inference_mode(False), torch.no_grad():
                self._context_cache = (key, self._encode_prompts())
        return self._context_cache[1]

    # --- noise -------------------------------------------------------------------------------
    def _noise_bank(self, count: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(count, C, h, w): noise for the k-th scoring timestep, the same for every image, drawn
        one timestep at a time from ``seed`` (so a shorter timestep list reuses the same noise)."""
        key = (count, tuple(latent_shape), self.backbone.device)
        if self._bank_cache is None or self._bank_cache[0] != key:
            generator = torch.Generator().manual_seed(self.config["seed"])
            with torch.inference_mode(False):
                bank = torch.stack([torch.randn(latent_shape, generator=generator) for _ in range(count)])
                self._bank_cache = (key, bank.to(self.backbone.device))
        return self._bank_cache[1]

    # --- the U-Net pass ----------------------------------------------------------------------
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = pixels.new_tensor(_CLIP_MEAN).view(1, 3, 1, 1)
        std = pixels.new_tensor(_CLIP_STD).view(1, 3, 1, 1)
        return self.backbone.encode((pixels - mean) / std)

    def _pair_scores(self, x0, noise, timesteps, context, queries: bool):
        """Layer scores (P, L) of P (latent, noise, timestep) triples, each run with both prompts
        in one U-Net batch of 2P rows; with ``queries``, also {layer: (P, 2, C_l)} query means."""
        pairs = x0.shape[0]
        alpha_bar = self.backbone.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x0.float() + (1 - alpha_bar).sqrt() * noise.float()
        sample = noisy.repeat_interleave(2, dim=0).to(self.backbone.dtype)  # rows: good, bad, good, …
        with self._recorder as record:
            eps_hat = self.unet(
                sample, timesteps.repeat_interleave(2), encoder_hidden_states=context.repeat(pairs, 1, 1)
            ).sample
            # Mean over both prompt rows, heads and tokens (the released per-layer reduction).
            attention = torch.stack([record.pooled[name].reshape(pairs, -1).mean(dim=1) for name in self._layers], 1)
            query_means = (
                {name: record.query_means[name].reshape(pairs, 2, -1).float() for name in self._layers}
                if queries
                else None
            )
        errors = (noise.float().repeat_interleave(2, dim=0) - eps_hat.float()).flatten(1).norm(dim=1).view(pairs, 2)
        return attention + (errors[:, 0] - errors[:, 1])[:, None], query_means

    def _chunked(self, x0, noise, timesteps, context, queries: bool):
        per_call = self.config["unet_batch"] // 2
        # A backward pass through a scoring (quality maps, enhancement) would otherwise keep every
        # U-Net call's activations, 16 an image, until it runs: each call is recomputed in the
        # backward pass instead, so memory holds one call's. Training keeps them (one call a batch).
        recompute = torch.is_grad_enabled() and not self.training
        scores, query_parts = [], []
        for start in range(0, x0.shape[0], per_call):
            part = slice(start, start + per_call)
            inputs = (x0[part], noise[part], timesteps[part], context, queries)
            if recompute:
                out = torch.utils.checkpoint.checkpoint(self._pair_scores, *inputs, use_reentrant=False)
            else:
                out = self._pair_scores(*inputs)
            scores.append(out[0])
            query_parts.append(out[1])
        merged = {name: torch.cat([q[name] for q in query_parts]) for name in self._layers} if queries else None
        return torch.cat(scores), merged

    # --- public API --------------------------------------------------------------------------
    def layer_scores(self, pixels: torch.Tensor, timesteps=None, *, noise=None, return_query_features: bool = False):
        """(B, L) per-layer scores of (B, 3, R, R) pixels in [0, 1], averaged over ``timesteps``
        (default: the config's); layers in :meth:`feature_layers` order.

        The k-th timestep uses the k-th noise of the seeded bank, or ``noise[k]`` when ``noise``
        (T, C, h, w) is given (GenzVQA training shares one random t and noise across a video's
        frames). With ``return_query_features`` also returns {layer: (B, T, 2, C_l)}: each layer's
        spatial-mean query features per timestep and prompt (good, bad), which GenzVQA's temporal
        modulator reads."""
        steps = [int(t) for t in (self.config["timesteps"] if timesteps is None else timesteps)]
        latents = self._encode(pixels)
        images, count = latents.shape[0], len(steps)
        if noise is None:
            noise = self._noise_bank(count, tuple(latents.shape[1:]))
        elif tuple(noise.shape) != (count, *latents.shape[1:]):
            raise ValueError(f"noise must be shaped {(count, *latents.shape[1:])}, got {tuple(noise.shape)}")
        # Pair order is image-major: pair b*T + k is image b at timestep k.
        x0 = latents.repeat_interleave(count, dim=0)
        noise = noise.to(latents.device).repeat(images, 1, 1, 1)
        t = torch.tensor(steps, device=latents.device).repeat(images)
        layers, queries = self._chunked(x0, noise, t, self._prompt_context(), return_query_features)
        scores = layers.view(images, count, -1).mean(dim=1)
        if not return_query_features:
            return scores
        return scores, {name: q.view(images, count, 2, -1) for name, q in queries.items()}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B,) scores: mean over layers and timesteps."""
        return self.layer_scores(pixels).mean(dim=1)

    def quality_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and the quality map (B, R, R): the detail map integrated along the path from
        the blurred image (:func:`diqa_cli.maps.compute.detail_map` with ``steps=8``)."""
        from diqa_cli.maps.compute import detail_map

        return detail_map(self, pixels, steps=MAP_STEPS)

    def training_loss(self, pixels: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE of the score at one random t ∈ [0, 100) per image, with fresh noise from
        ``generator`` (the released training step), against ``targets``."""
        latents = self._encode(pixels)
        images = latents.shape[0]
        t = torch.randint(0, _TRAIN_TIMESTEPS, (images,), generator=generator, device=generator.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        context = self._encode_prompts()  # always fresh: the loss must reach ctx
        layers, _ = self._chunked(latents, noise.to(latents.device), t.to(latents.device), context, False)
        return F.mse_loss(layers.mean(dim=1), targets.to(layers.device).float())

    def feature_layers(self) -> list[str]:
        """The U-Net cross-attention layers read, in execution order (16 for SD 2.1-base)."""
        return list(self._layers)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """The paper's defaults: the tiny U-Net is cheap enough for all 8 timesteps."""
        return {}

    # --- training and checkpoints ------------------------------------------------------------
    def _checkpoint_names(self) -> dict[str, str]:
        """Released checkpoint name -> this model's parameter name, for every trainable tensor."""
        names = {"ctx": "ctx"}
        for name, _ in self.unet.named_parameters():
            if f".{_ADAPTER}." not in name:
                continue
            layer_and_target, matrix = name.split(f".{_ADAPTER}.")[0].rsplit(".", 1)
            layer, target = next(
                (layer_and_target[: -len(suffix) - 1], released)
                for suffix, released in _LORA_TARGETS.items()
                if layer_and_target.endswith("." + suffix)
            )
            names[f"{layer}.processor.{target}.{_LORA_MATRICES[matrix]}.weight"] = f"unet.{name}"
        return names

    # --- released checkpoints --------------------------------------------------------------------
    @classmethod
    def convert_released_files(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The released training saves, per step, the prompt learner (``coop_Model_state_dict.pth``:
        ``ctx``, ``token_prefix``, ``token_suffix``) and the U-Net's LoRA attention processors
        (diffusers 0.17 ``save_attn_procs``, renamed ``pytorch_model.bin``). Keeps ``ctx`` and the
        cross-attention (attn2) LoRA; drops the prompt tokens' embeddings (rebuilt from the backbone's
        text encoder) and the self-attention LoRA, which the released training keeps at zero."""
        return cls._convert_genz_files(states, extra_parts=())

    @classmethod
    def _convert_genz_files(cls, states, *, extra_parts) -> dict[str, torch.Tensor]:
        prompts = [s for s in states if "ctx" in s]
        loras = [s for s in states if any(".processor." in k for k in s)]
        others = [s for s in states if s not in prompts and s not in loras]
        if len(prompts) != 1 or len(loras) != 1:
            raise WeightsError(
                f"{cls.method_name} is released as a prompt-learner file (with 'ctx') and a LoRA "
                f"attention-processor file ('….processor.to_q_lora.down.weight'); got {len(prompts)} and "
                f"{len(loras)} of them"
            )
        lora = loras[0]
        self_lora = {k: v for k, v in lora.items() if ".attn1.processor." in k}
        if any(k.endswith("_lora.up.weight") and bool(v.abs().max() > 0) for k, v in self_lora.items()):
            raise WeightsError(
                "the LoRA file has non-zero self-attention (attn1) LoRA weights; the released training "
                "keeps them at zero and diqa does not build them, so this head would score differently"
            )
        cross = {k: v for k, v in lora.items() if ".attn2.processor." in k}
        if len(cross) + len(self_lora) != len(lora) or not cross:
            raise WeightsError("the LoRA file holds keys other than attn1/attn2 LoRA processors; not a GenzIQA LoRA file")
        ctx = prompts[0]["ctx"]
        widths = {v.shape[1] for k, v in cross.items() if ".to_k_lora.down." in k}
        if widths != {ctx.shape[-1]}:
            raise WeightsError(
                f"the prompt learner's context vectors are {ctx.shape[-1]}-d but the LoRA's cross-attention "
                f"reads {sorted(widths)}-d text tokens: these files are not from the same model"
            )
        converted = {"ctx": ctx, **cross}
        if extra_parts:
            converted.update(cls._convert_extra_parts(others, extra_parts))
        elif others:
            raise WeightsError(f"{len(others)} file(s) are neither the prompt learner nor the LoRA file")
        return converted

    def trainable_parameter_names(self) -> list[str]:
        """``ctx`` and the cross-attention LoRA matrices; the U-Net, VAE and text encoder stay frozen."""
        return list(self._checkpoint_names().values())

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {saved: params[own].detach().contiguous() for saved, own in self._checkpoint_names().items()}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = self._checkpoint_names()
        missing = sorted(set(names) - set(state))
        unexpected = sorted(set(state) - set(names))
        params = dict(self.named_parameters())
        wrong = sorted(k for k in set(names) & set(state) if tuple(state[k].shape) != tuple(params[names[k]].shape))
        if missing or unexpected or wrong:
            parts = [
                f"{label} {keys[:5]}{' …' if len(keys) > 5 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if keys
            ]
            raise WeightsError(f"checkpoint does not fit method {self.method_name!r}: " + "; ".join(parts))
        with torch.no_grad():
            for saved, own in names.items():
                params[own].copy_(state[saved])
