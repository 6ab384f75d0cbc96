"""GenzVQA (Mitra, De, Rao, Soundararajan; arXiv 2406.04654, TMLR): GenzIQA over video frames
with the temporal quality modulator, as the released code sh-r/GenzIVQA computes it.

How a video is scored:

1. Frames are picked by timestamp (``diqa_cli.videoio``; 8 spread over the video by default, as
   the released KoNViD test) and resized to 512 x 512 bicubic, aspect ratio ignored.
2. Each frame gets GenzIQA's 16 cross-attention layer scores at t ∈ {9, 34, 59, 84} (prompts
   "Good Photo." / "Bad Photo.", shared context vectors, cross-attention LoRA, log-sum-exp pooled
   logits plus the denoising-error difference), averaged over the timesteps. Frames of a video go
   through the U-Net together, ``unet_batch`` rows a call.
3. The frozen SlowFast R50 gives one 2048-d slow and one 256-d fast feature per clip (one 32-frame
   clip per second of video; ``diqa_cli.models.slowfast``).
4. Temporal quality modulator, per cross-attention layer l with query width C_l: the slow features
   pass LayerNorm → Linear(2048→64) → Linear(64→C_l) and the fast ones LayerNorm → Linear(256→64)
   → Linear(64→C_l) (the released ``AttentionBlock``), giving keys (clips, C_l). The frames'
   spatial-mean query features of that layer (both prompt rows) attend to them: the dot products,
   split into heads of 64 channels, multiplied by 8 (the released ``/ (64 ** -0.5)``) and averaged
   over heads, prompt rows, frames and clips, give s_slow and s_fast. Averaging per-head dot
   products over the C_l / 64 heads equals the full dot product divided by C_l / 64, which is how it
   is computed (no head split is materialised). γ_l = ReLU(Linear(2→1)([s_slow, s_fast])).
5. Video score = mean over layers of γ_l × (layer score averaged over frames). Each frame's own
   score is mean over layers of γ_l × its layer score; the video score is their mean.

Quality maps (``diqa score-video --maps``; not in the paper): one per scored frame, GenzIQA's map
(the detail map integrated along the path from the blurred frame) of the frame's own score (mean
over layers of γ × layer score, γ held fixed at the video's).

Where diqa departs from the released code (each also in the method spec): GenzIQA's departures
(posterior mean, seeded noise bank, no test-time flips, per-frame layer scores, peft LoRA);
frames picked by timestamp; SlowFast features computed in the run from one clip per second
(the released code reads precomputed ``.npy`` features whose extraction was not published; a
(clips, D) array is what its attention accepts).

The query features are those of the last scoring timestep (84): the released pipeline returns
the query features of its last timestep loop iteration. In training, one random t ∈ [0, 100) and
one noise tensor per video are shared by all its frames, as released.

Checkpoint: GenzIQA's names (``ctx``, ``<attn2>.processor.to_*_lora.{down,up}.weight``) plus the
released modulator files' state dicts under their stems: ``slowAttn.<block>.*``,
``fastAttn.<block>.*``, ``linearBlocks.<block>.*`` with the released block names
(``down_block_0_attn_0`` … ``up_block_3_attn_2``). The config names the SlowFast weights
(``slowfast``: a manifest name, or a path, relative ones taken from the checkpoint's folder) and,
once features were computed with them, their SHA-256 (``slowfast_sha256``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diqa_cli.errors import DiqaWarning, UsageError, WeightsError
from diqa_cli.methods.genzvqa import GENZVQA_TIMESTEPS
from diqa_cli.models.genziqa import GenzIQA
from diqa_cli.models.slowfast import SLOWFAST_MANIFEST_NAME, SlowFastFeatures, tiny_slowfast_config

__all__ = ["GenzVQA", "KeyProjection", "VideoScore", "released_block_name"]

# Training draws t uniformly from [0, 100), the released range.
_TRAIN_TIMESTEPS = 100
_MODULATOR_PARTS = ("slowAttn", "fastAttn", "linearBlocks")


def released_block_name(layer: str) -> str:
    """The released name of a cross-attention layer: ``down_blocks.0.attentions.1.…attn2`` →
    ``down_block_0_attn_1``, ``mid_block.attentions.0.…`` → ``mid_block_attn_0``. A transformer
    block other than the first (SD has one per attention) gets ``_tb<j>``."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        stem, rest = "mid_block", parts[1:]
    else:
        stem, rest = f"{parts[0][:-1]}_{parts[1]}", parts[2:]
    if len(rest) < 4 or rest[0] != "attentions" or rest[2] != "transformer_blocks":
        raise ValueError(f"not a U-Net cross-attention layer name: {layer!r}")
    name = f"{stem}_attn_{rest[1]}"
    return name if rest[3] == "0" else f"{name}_tb{rest[3]}"


class KeyProjection(nn.Module):
    """The released ``AttentionBlock``: LayerNorm, then a rank-``rank`` down and up projection of
    SlowFast features to a layer's query width (parameter names as released)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 64):
        super().__init__()
        self.k_down = nn.Linear(in_features, rank)
        self.k_up = nn.Linear(rank, out_features)
        self.norm = nn.LayerNorm(in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.k_up(self.k_down(self.norm(features)))


@dataclass
class VideoScore:
    """One video's result: ``score`` (raw, a 0-d tensor, differentiable), ``frame_scores`` (F,),
    ``layer_scores`` (L,) averaged over frames, ``gamma`` (L,) the modulator's multipliers,
    ``similarities`` (L, 2) the slow and fast attention terms."""

    score: torch.Tensor
    frame_scores: torch.Tensor
    layer_scores: torch.Tensor
    gamma: torch.Tensor
    similarities: torch.Tensor


class GenzVQA(GenzIQA):
    """GenzVQA quality model: see the module docstring. Config: GenzIQA's (``timesteps`` default
    {9, 34, 59, 84}) plus ``slowfast`` (the SlowFast weights it goes with), ``slowfast_sha256``,
    ``slow_dim`` / ``fast_dim`` (SlowFast feature widths, 2048 / 256), ``key_rank`` (64),
    ``logit_scale`` (8, the released ``/ 64 ** -0.5``) and ``head_dim`` (64)."""

    method_name = "genzvqa"
    clip_encoder_column: ClassVar[str] = "slowfast"  # the output column naming the SlowFast weights

    def __init__(
        self,
        backbone,
        *,
        timesteps=GENZVQA_TIMESTEPS,
        prompts=("Good Photo.", "Bad Photo."),
        context_tokens: int = 16,
        lora_rank: int = 4,
        lse_temperature: float = 0.14,
        unet_batch: int = 16,
        seed: int = 0,
        resolution: int | None = None,
        slowfast: str = SLOWFAST_MANIFEST_NAME,
        slowfast_sha256: str | None = None,
        slow_dim: int = 2048,
        fast_dim: int = 256,
        key_rank: int = 64,
        logit_scale: float = 8.0,
        head_dim: int = 64,
    ):
        super().__init__(
            backbone,
            timesteps=timesteps,
            prompts=prompts,
            context_tokens=context_tokens,
            lora_rank=lora_rank,
            lse_temperature=lse_temperature,
            unet_batch=unet_batch,
            seed=seed,
            resolution=resolution,
        )
        self.config.update(
            slowfast=str(slowfast),
            slowfast_sha256=slowfast_sha256,
            slow_dim=int(slow_dim),
            fast_dim=int(fast_dim),
            key_rank=int(key_rank),
            logit_scale=float(logit_scale),
            head_dim=int(head_dim),
        )
        modules = dict(backbone.unet.named_modules())
        self._widths = {layer: modules[layer].to_q.out_features for layer in self._layers}
        self._blocks = {layer: released_block_name(layer) for layer in self._layers}
        if len(set(self._blocks.values())) != len(self._blocks):
            raise UsageError(f"backbone {backbone.ref!r}: cross-attention layers do not map to distinct released names")
        cuda = [backbone.device] if backbone.device.type == "cuda" else []
        # nn.Linear initialises from the global generator; fork it so a fresh head is reproducible.
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.config["seed"])
            self.slowAttn = nn.ModuleDict(
                {self._blocks[l]: KeyProjection(slow_dim, self._widths[l], key_rank) for l in self._layers}
            )
            self.fastAttn = nn.ModuleDict(
                {self._blocks[l]: KeyProjection(fast_dim, self._widths[l], key_rank) for l in self._layers}
            )
            self.linearBlocks = nn.ModuleDict({self._blocks[l]: nn.Linear(2, 1) for l in self._layers})
        for part in _MODULATOR_PARTS:
            getattr(self, part).to(backbone.device)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """For the tiny backbone and the tiny SlowFast of ``write_tiny_slowfast``, which the tiny
        bundle writes as ``DIR/slowfast.safetensors`` beside ``DIR/heads/`` (hence the path)."""
        tiny = tiny_slowfast_config()
        slow = tiny["width"] * 32
        return {"slowfast": "../slowfast.safetensors", "slow_dim": slow, "fast_dim": slow // tiny["channel_ratio"]}

    # --- the SlowFast it goes with ---------------------------------------------------------------
    def check_slowfast(self, extractor: SlowFastFeatures) -> None:
        """Refuse a SlowFast whose feature widths the modulator cannot read; warn when its weights
        are not the ones the checkpoint recorded; record them when none were."""
        dims = extractor.feature_dims
        wanted = (self.config["slow_dim"], self.config["fast_dim"])
        if dims != wanted:
            raise UsageError(
                f"the GenzVQA head reads {wanted[0]}-d slow and {wanted[1]}-d fast SlowFast features, but "
                f"SlowFast {extractor.ref!r} gives {dims[0]} and {dims[1]}; pass the --slowfast it was trained with"
            )
        recorded = self.config.get("slowfast_sha256")
        if recorded and extractor.identity and extractor.identity != recorded:
            warnings.warn(
                f"the GenzVQA head was trained with SlowFast weights {self.config['slowfast']!r} "
                f"(sha256 {recorded[:12]}), but {extractor.ref!r} has sha256 {extractor.identity[:12]}; "
                "scores will not match the trained head",
                DiqaWarning,
                stacklevel=2,
            )
        elif not recorded and extractor.identity:
            self.config["slowfast_sha256"] = extractor.identity

    def load_clip_encoder(
        self, ref: str | None = None, *, relative_to: str | Path | None = None, offline: bool = False
    ) -> SlowFastFeatures:
        """The frozen SlowFast this head reads: ``ref``, else the config's ``slowfast`` (a relative
        path taken from ``relative_to``, the checkpoint's folder), on the U-Net's device, checked
        with :meth:`check_slowfast`."""
        from diqa_cli.models.slowfast import load_slowfast

        bb = self.backbone
        extractor = load_slowfast(
            ref or self.config["slowfast"],
            device=bb.device,
            # SlowFast is cheap beside the U-Net: half precision only where the U-Net runs in it on a GPU.
            dtype=bb.dtype if bb.device.type == "cuda" else torch.float32,
            offline=offline,
            relative_to=relative_to if ref is None else None,
        )
        self.check_slowfast(extractor)
        return extractor

    def adopt_clip_encoder(self, extractor: SlowFastFeatures) -> None:
        """Training: the head goes with these SlowFast weights, and its sidecar will name them."""
        self.check_slowfast(extractor)
        self.config.update(slowfast=extractor.ref, slowfast_sha256=extractor.identity)

    @classmethod
    def write_tiny_assets(cls, directory: Path) -> None:
        """The tiny SlowFast, as ``directory/slowfast.safetensors`` (where ``tiny_config`` points)."""
        from diqa_cli.models.slowfast import write_tiny_slowfast

        write_tiny_slowfast(Path(directory))

    # --- scoring ---------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Not defined for a batch of images: a GenzVQA score needs a video's frames and its
        SlowFast features (:meth:`score_video`)."""
        raise UsageError(
            "GenzVQA scores videos, not image batches: use `diqa score-video`, or "
            "GenzVQA.score_video(frames, slow, fast) with the video's SlowFast features"
        )

    def modulate(
        self, queries: dict[str, torch.Tensor], slow: torch.Tensor, fast: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ (L,) and the attention terms (L, 2: slow, fast) of one video from its frames'
        query means {layer: (F, 2, C_l)} and its SlowFast features slow (N, D_slow), fast (N, D_fast)."""
        if slow.ndim != 2 or fast.ndim != 2 or not len(slow) or not len(fast):
            raise ValueError(f"SlowFast features must be (clips, D), got {tuple(slow.shape)} and {tuple(fast.shape)}")
        device = self.ctx.device
        slow, fast = slow.to(device, torch.float32), fast.to(device, torch.float32)
        scale = self.config["logit_scale"] * self.config["head_dim"]
        gammas, terms = [], []
        for layer in self._layers:
            block, width = self._blocks[layer], self._widths[layer]
            query = queries[layer].to(device, torch.float32).reshape(-1, width)
            pair = torch.stack(
                [(query @ self.slowAttn[block](slow).T).mean(), (query @ self.fastAttn[block](fast).T).mean()]
            ) * (scale / width)
            terms.append(pair)
            gammas.append(F.relu(self.linearBlocks[block](pair)).squeeze(-1))
        return torch.stack(gammas), torch.stack(terms)

    def _video_score(self, layers: torch.Tensor, queries: dict[str, torch.Tensor], slow, fast) -> VideoScore:
        """From per-frame layer scores (F, L) and last-timestep query means {layer: (F, 2, C)}."""
        gamma, terms = self.modulate(queries, slow, fast)
        frame_scores = (layers.float() * gamma).mean(dim=1)
        return VideoScore(frame_scores.mean(), frame_scores, layers.float().mean(dim=0), gamma, terms)

    def frame_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Frames (B, 3, R, R) in [0, 1] -> their layer scores (B, L), averaged over the scoring
        timesteps, and each layer's spatial-mean query features (B, 2, C_l) at the last one."""
        layers, queries = self.layer_scores(pixels, return_query_features=True)
        return layers, {name: q[:, -1] for name, q in queries.items()}

    def video_score(self, frame_features: tuple, clip_features: tuple[torch.Tensor, ...]) -> VideoScore:
        """The video pipeline's call: all frames' :meth:`frame_features` and the SlowFast
        (slow, fast) features of all clips."""
        layers, queries = frame_features
        slow, fast = clip_features
        return self._video_score(layers, queries, slow, fast)

    def video_quality_maps(self, frames: torch.Tensor, clip_features: tuple[torch.Tensor, ...]):
        """One video's chosen frames (F, 3, R, R) in [0, 1] and its (slow, fast) SlowFast features ->
        ((F,) raw frame scores, (F, R, R) maps): GenzIQA's map (the detail map integrated along the
        path from the blurred frame) of each frame's own score, the mean over layers of γ × layer
        score, with the modulator's γ of the whole video held fixed."""
        from diqa_cli.maps.compute import detail_map
        from diqa_cli.models.genziqa import MAP_STEPS

        slow, fast = clip_features
        with torch.no_grad():
            _, queries = self.frame_features(frames)
            gamma, _ = self.modulate(queries, slow, fast)

        def frame_scores(pixels: torch.Tensor) -> torch.Tensor:
            return (self.layer_scores(pixels).float() * gamma.float()).mean(dim=1)

        return detail_map(frame_scores, frames, steps=MAP_STEPS)

    def video_scores(self, frame_batches: Iterable[torch.Tensor], slow: torch.Tensor, fast: torch.Tensor) -> VideoScore:
        """Score one video whose frames arrive in batches (B, 3, R, R) in [0, 1], with its SlowFast
        features slow (N, D_slow) and fast (N, D_fast). Only per-frame layer scores and query means
        are kept between batches."""
        layer_parts: list[torch.Tensor] = []
        query_parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._layers}
        for pixels in frame_batches:
            layers, queries = self.frame_features(pixels)
            layer_parts.append(layers)
            for name, q in queries.items():
                query_parts[name].append(q)
        if not layer_parts:
            raise ValueError("a video needs at least one frame")
        return self._video_score(
            torch.cat(layer_parts), {name: torch.cat(parts) for name, parts in query_parts.items()}, slow, fast
        )

    def score_video(self, frames: torch.Tensor, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        """The raw score (0-d tensor) of one video: frames (F, 3, R, R) in [0, 1], slow (N, D_slow),
        fast (N, D_fast). Frames go through the U-Net together."""
        return self.video_scores([frames], slow, fast).score

    # --- training --------------------------------------------------------------------------------
    def training_loss(self, videos, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MSE of a batch of videos (:class:`diqa_cli.pipelines.datasets.VideoBatch`: per video its
        frames and (slow, fast) SlowFast features) against ``targets`` (normalised MOS). Each
        video draws one t ∈ [0, 100) and one noise tensor from ``generator``, shared by its frames
        (the released training step); all frames of the batch go through the U-Net together."""
        if isinstance(videos, torch.Tensor):
            raise UsageError("GenzVQA trains on videos: pass a VideoBatch (frames and SlowFast features per video)")
        context = self._encode_prompts()  # fresh each step: the loss must reach ctx
        x0, noise, steps, counts = [], [], [], []
        for frames in videos.frames:
            latents = self._encode(frames)
            t = torch.randint(0, _TRAIN_TIMESTEPS, (1,), generator=generator, device=generator.device)
            shared = torch.randn(latents.shape[1:], generator=generator, device=generator.device)
            x0.append(latents)
            noise.append(shared.to(latents.device).expand_as(latents))
            steps.append(t.to(latents.device).expand(len(latents)))
            counts.append(len(latents))
        layers, queries = self._chunked(torch.cat(x0), torch.cat(noise), torch.cat(steps), context, True)
        scores = []
        for i, (layer_part, (slow, fast)) in enumerate(zip(layers.split(counts), videos.clip_features)):
            part = {name: q.split(counts)[i] for name, q in queries.items()}
            scores.append(self._video_score(layer_part, part, slow, fast).score)
        return F.mse_loss(torch.stack(scores), targets.to(layers.device).float())

    def load_init_state_dict(self, state: dict[str, torch.Tensor], method: str) -> None:
        """Start from a GenzIQA head (the spec's ``init_from``): load its ``ctx`` and LoRA (same
        names) strictly and leave the modulator as initialised, the released way to train GenzVQA."""
        names = GenzIQA._checkpoint_names(self)
        missing = sorted(set(names) - set(state))
        unexpected = sorted(set(state) - set(names))
        if missing or unexpected:
            raise WeightsError(
                "not a GenzIQA checkpoint for this backbone: "
                + "; ".join(f"{label} {keys[:4]}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for saved, own in names.items():
                params[own].copy_(state[saved])

    # --- released checkpoints ----------------------------------------------------------------------
    @classmethod
    def convert_released_files(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """GenzIQA's two files plus the modulator's three state dicts (``slowAttn``, ``fastAttn``,
        ``linearBlocks``: per released block name, e.g. ``down_block_0_attn_0.k_down.weight``), in
        any order: slow and fast are told apart by their feature widths (2048 > 256)."""
        return cls._convert_genz_files(states, extra_parts=_MODULATOR_PARTS)

    @classmethod
    def _convert_extra_parts(cls, states, parts) -> dict[str, torch.Tensor]:
        linear = [s for s in states if s and all(k.endswith((".weight", ".bias")) and k.count(".") == 1 for k in s)]
        keyed = [s for s in states if s not in linear and any(".k_down." in k for k in s)]
        if len(linear) != 1 or len(keyed) != 2 or len(states) != 3:
            raise WeightsError(
                "GenzVQA's modulator is released as three files (slowAttn, fastAttn, linearBlocks state dicts); "
                f"found {len(keyed)} key-projection and {len(linear)} linear-block file(s) among {len(states)}"
            )

        def width(state):
            return next(v.shape[0] for k, v in state.items() if k.endswith(".norm.weight"))

        fast, slow = sorted(keyed, key=width)
        blocks = {k.split(".")[0] for k in linear[0]}
        for name, state in (("slowAttn", slow), ("fastAttn", fast)):
            if {k.split(".")[0] for k in state} != blocks:
                raise WeightsError(f"the {name} file's blocks differ from linearBlocks': these files are not from one model")
        return {f"{part}.{k}": v for part, state in zip(parts, (slow, fast, linear[0])) for k, v in state.items()}

    # --- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_names(self) -> dict[str, str]:
        """GenzIQA's names plus the modulator's, which are its own parameter names."""
        names = super()._checkpoint_names()
        for part in _MODULATOR_PARTS:
            for name, _ in getattr(self, part).named_parameters():
                names[f"{part}.{name}"] = f"{part}.{name}"
        return names
