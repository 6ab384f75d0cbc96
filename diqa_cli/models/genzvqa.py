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

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diqa_cli.errors import InputError, UsageError, WeightsError
from diqa_cli.methods.genzvqa import GENZVQA_TIMESTEPS
from diqa_cli.models.genziqa import GenzIQA
from diqa_cli.models.slowfast import SLOWFAST_MANIFEST_NAME, SlowFastFeatures, tiny_slowfast_config

__all__ = [
    "GenzVQA",
    "KeyProjection",
    "VideoBatch",
    "VideoInput",
    "VideoScore",
    "VideoTrainingSet",
    "load_video_input",
    "score_videos",
]

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
        import sys

        dims = extractor.feature_dims
        wanted = (self.config["slow_dim"], self.config["fast_dim"])
        if dims != wanted:
            raise UsageError(
                f"the GenzVQA head reads {wanted[0]}-d slow and {wanted[1]}-d fast SlowFast features, but "
                f"SlowFast {extractor.ref!r} gives {dims[0]} and {dims[1]}; pass the --slowfast it was trained with"
            )
        recorded = self.config.get("slowfast_sha256")
        if recorded and extractor.identity and extractor.identity != recorded:
            print(
                f"diqa: warning: the GenzVQA head was trained with SlowFast weights {self.config['slowfast']!r} "
                f"(sha256 {recorded[:12]}), but {extractor.ref!r} has sha256 {extractor.identity[:12]}; "
                "scores will not match the trained head",
                file=sys.stderr,
            )
        elif not recorded and extractor.identity:
            self.config["slowfast_sha256"] = extractor.identity

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
        """MSE of a batch of videos (:class:`VideoBatch`) against ``targets`` (normalised MOS). Each
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
        for i, (layer_part, slow, fast) in enumerate(zip(layers.split(counts), videos.slow, videos.fast)):
            part = {name: q.split(counts)[i] for name, q in queries.items()}
            scores.append(self._video_score(layer_part, part, slow, fast).score)
        return F.mse_loss(torch.stack(scores), targets.to(layers.device).float())

    def load_image_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a GenzIQA head: load its ``ctx`` and LoRA (same names) strictly and leave the
        modulator as initialised, the released way to train GenzVQA."""
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

    # --- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_names(self) -> dict[str, str]:
        """GenzIQA's names plus the modulator's, which are its own parameter names."""
        names = super()._checkpoint_names()
        for part in _MODULATOR_PARTS:
            for name, _ in getattr(self, part).named_parameters():
                names[f"{part}.{name}"] = f"{part}.{name}"
        return names


# --- decoding a video for the model -------------------------------------------------------------


@dataclass
class VideoInput:
    """One video decoded for GenzVQA: frames (F, 3, R, R) in [0, 1], SlowFast features (N, D) (None
    when not asked for), and what a row reports (``frames_sampled`` = decoded + ``frames_lost``)."""

    path: str
    frames: torch.Tensor
    timestamps: np.ndarray
    slow: torch.Tensor | None
    fast: torch.Tensor | None
    decoder: str
    duration: float
    frames_sampled: int
    frames_lost: int
    clips: int


@dataclass
class VideoBatch:
    """A training batch: per video its frames and SlowFast features (videos differ in length)."""

    frames: list[torch.Tensor]
    slow: list[torch.Tensor]
    fast: list[torch.Tensor]

    def to(self, device=None, dtype=None) -> VideoBatch:
        """Frames to ``device`` / ``dtype``; features to ``device`` (kept float32)."""
        return VideoBatch(
            [f.to(device=device, dtype=dtype) for f in self.frames],
            [s.to(device=device) for s in self.slow],
            [s.to(device=device) for s in self.fast],
        )

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class _Decoded:
    """What the decoding side of one video produced, filled in as it goes."""

    reader: Any = None
    frames_sampled: int = 0
    frame_stats: Any = None
    clip_stats: Any = None
    decode_seconds: float = 0.0


def _decode_items(path, *, model, slowfast, fps_sub, max_frames, max_clips, decoder, batch, state: _Decoded):
    """Yield ("clip", (3, T, S, S) float32) for every SlowFast clip (none when ``slowfast`` is
    None), then ("frames", (timestamps, (b, 3, R, R) float32)) for the chosen frames in batches.
    Time spent here is decoding (and resizing), recorded in ``state.decode_seconds``."""
    from diqa_cli.videoio import DecodeStats, open_video, resize_frame

    start = time.perf_counter()
    reader = state.reader = open_video(path, decoder=decoder)
    try:
        if fps_sub is None and max_frames is None:
            max_frames = model.spec.extra.get("frames_per_video", 8)
        state.clip_stats, state.frame_stats = DecodeStats(), DecodeStats()
        if slowfast is not None:
            plan = reader.clip_plan(clip_len=slowfast.clip_frames, max_clips=max_clips)
            mean, std = slowfast.config["mean"], slowfast.config["std"]
            for clip in reader.clips(plan, size=slowfast.crop_size, mean=mean, std=std, stats=state.clip_stats):
                state.decode_seconds += time.perf_counter() - start
                yield "clip", clip
                start = time.perf_counter()
        # Planned after the clips: should decord have failed on them, PyAV's timeline is the one.
        frames = reader.plan(fps_sub=fps_sub, max_frames=max_frames)
        state.frames_sampled = frames.sampled
        state.frame_stats.requested += frames.unreachable  # sample times past a cut-short end: lost
        resample = model.spec.resample
        for chunk in reader.frames(frames.indices, batch=batch, stats=state.frame_stats):
            pixels = np.stack([resize_frame(rgb, model.resolution, resample=resample) for rgb in chunk.frames])
            state.decode_seconds += time.perf_counter() - start
            yield "frames", (chunk.timestamps, pixels)
            start = time.perf_counter()
        state.decode_seconds += time.perf_counter() - start
    finally:
        reader.close()


def _background(items: Iterator, depth: int = 2) -> Iterator:
    """Run ``items`` in a thread ``depth`` items ahead, so decoding overlaps the networks (both
    release the GIL). Exceptions reach the consumer; closing the consumer stops the thread."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                channel.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer as it is
            put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                items.close()

    worker = threading.Thread(target=run, name="diqa-video-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=10)


def _slowfast_features(slowfast: SlowFastFeatures, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(slowfast.parameters()).device
    return slowfast.extract_features(torch.from_numpy(np.stack(clips)).to(device))


def load_video_input(
    path: str,
    model: GenzVQA,
    slowfast: SlowFastFeatures | None,
    *,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    max_clips: int = 16,
    decoder: str = "auto",
    clip_batch: int = 4,
) -> VideoInput:
    """Decode one video for ``model``: its chosen frames at the model's resolution and its SlowFast
    features (computed here; with ``slowfast`` None, frames only and ``slow``/``fast`` None).
    Raises ``InputError`` when nothing usable decodes."""
    state = _Decoded()
    clips, slow, fast, frames, times = [], [], [], [], []
    for kind, value in _decode_items(
        path, model=model, slowfast=slowfast, fps_sub=fps_sub, max_frames=max_frames,
        max_clips=max_clips, decoder=decoder, batch=8, state=state,
    ):
        if kind == "clip":
            clips.append(value)
            if len(clips) == clip_batch:
                s, f = _slowfast_features(slowfast, clips)
                slow.append(s), fast.append(f)
                clips = []
        else:
            times.append(value[0])
            frames.append(torch.from_numpy(value[1]))
    if clips:
        s, f = _slowfast_features(slowfast, clips)
        slow.append(s), fast.append(f)
    _check_decoded(path, state, frames, slow if slowfast is not None else [None])
    return VideoInput(
        path=str(path),
        frames=torch.cat(frames),
        timestamps=np.concatenate(times),
        slow=torch.cat(slow).cpu() if slow else None,
        fast=torch.cat(fast).cpu() if fast else None,
        decoder=state.reader.decoder,
        duration=state.reader.duration,
        frames_sampled=state.frames_sampled,
        frames_lost=state.frame_stats.lost,
        clips=sum(len(s) for s in slow),
    )


def _check_decoded(path, state: _Decoded, frames: list, slow: list) -> None:
    if not frames:
        raise InputError(path, f"none of the {state.frames_sampled} chosen frames could be decoded")
    if not slow:
        raise InputError(path, "no SlowFast clip could be decoded")


# --- the scoring pipeline -----------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def score_videos(
    items: Iterable,
    model: GenzVQA,
    slowfast: SlowFastFeatures,
    *,
    normalisation: dict,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    max_clips: int = 16,
    decoder: str = "auto",
    batch_size: int = 8,
    clip_batch: int = 4,
    per_frame: bool = False,
    timings: dict | None = None,
) -> Iterator[dict[str, Any]]:
    """Score videos one after another; yields one row per item, in order.

    ``items``: paths or ``imageio.InputItem`` (whose ``error`` makes an error row). Row keys:
    ``path, score, raw_score, status, error, frames_sampled, frames_decoded, frames_lost, decoder,
    duration, clips, method, backbone, slowfast, seconds`` and, with ``per_frame``, ``per_frame``:
    [{"time": seconds, "score": reported score}] per decoded frame. ``score = raw * scale + offset``.
    Decoding runs a thread ahead of the networks. ``timings`` (a dict) accumulates ``decode``,
    ``slowfast``, ``unet`` and ``wall`` seconds (decoding overlaps the networks, so the parts can
    add up to more than the wall time).
    """
    offset, scale = float(normalisation["offset"]), float(normalisation["scale"])
    context = {"method": model.method_name, "backbone": str(model.backbone.ref), "slowfast": slowfast.ref}
    model.eval()
    totals = timings if timings is not None else {}
    for key in ("decode", "slowfast", "unet", "wall"):
        totals.setdefault(key, 0.0)
    for item in items:
        path = str(getattr(item, "path", item))
        error = getattr(item, "error", None)
        if error:
            yield _error_row(path, error, context)
            continue
        started = time.perf_counter()
        state = _Decoded()
        try:
            row = _score_one(
                path, model, slowfast, state, offset=offset, scale=scale, fps_sub=fps_sub,
                max_frames=max_frames, max_clips=max_clips, decoder=decoder, batch_size=batch_size,
                clip_batch=clip_batch, per_frame=per_frame, totals=totals,
            )
        except InputError as exc:
            row = _error_row(path, exc.reason, context)
        except (UsageError, WeightsError):
            raise
        except Exception as exc:  # noqa: BLE001 - one video's failure must not stop the run
            row = _error_row(path, f"scoring failed: {type(exc).__name__}: {_one_line(exc)}", context)
        totals["decode"] += state.decode_seconds
        seconds = time.perf_counter() - started
        totals["wall"] += seconds
        row.update(context, seconds=seconds)
        if state.reader is not None and row["status"] == "error":
            row.update(decoder=state.reader.decoder, duration=state.reader.duration)
        yield row


def _error_row(path: str, reason: str, context: dict) -> dict[str, Any]:
    return {"path": path, "score": None, "raw_score": None, "status": "error", "error": reason, **context}


def _score_one(path, model, slowfast, state, *, offset, scale, fps_sub, max_frames, max_clips, decoder,
               batch_size, clip_batch, per_frame, totals) -> dict[str, Any]:
    items = _background(
        _decode_items(
            path, model=model, slowfast=slowfast, fps_sub=fps_sub, max_frames=max_frames,
            max_clips=max_clips, decoder=decoder, batch=batch_size, state=state,
        )
    )
    clips, slow, fast, layers, times = [], [], [], [], []
    queries: dict[str, list[torch.Tensor]] = {name: [] for name in model.feature_layers()}

    def run_slowfast() -> None:
        began = time.perf_counter()
        s, f = _slowfast_features(slowfast, clips)
        slow.append(s), fast.append(f)
        clips.clear()
        totals["slowfast"] += time.perf_counter() - began

    device, dtype = model.backbone.device, model.backbone.dtype
    with contextlib.closing(items), torch.no_grad():
        for kind, value in items:
            if kind == "clip":
                clips.append(value)
                if len(clips) == clip_batch:
                    run_slowfast()
                continue
            if clips:
                run_slowfast()
            began = time.perf_counter()
            frame_times, pixels = value
            layer_part, query_part = model.frame_features(torch.from_numpy(pixels).to(device, dtype))
            layers.append(layer_part)
            for name, q in query_part.items():
                queries[name].append(q)
            times.extend(frame_times.tolist())
            totals["unet"] += time.perf_counter() - began
        if clips:
            run_slowfast()
        _check_decoded(path, state, layers, slow)
        began = time.perf_counter()
        result = model._video_score(
            torch.cat(layers), {name: torch.cat(parts) for name, parts in queries.items()},
            torch.cat(slow), torch.cat(fast),
        )
        totals["unet"] += time.perf_counter() - began
    raw = float(result.score)
    if not math.isfinite(raw):
        raise InputError(path, f"model returned a non-finite score ({raw})")
    row = {
        "path": path,
        "score": raw * scale + offset,
        "raw_score": raw,
        "status": "ok",
        "error": None,
        "frames_sampled": state.frames_sampled,
        "frames_decoded": state.frame_stats.decoded,
        "frames_lost": state.frame_stats.lost,
        "decoder": state.reader.decoder,
        "duration": state.reader.duration,
        "clips": sum(len(s) for s in slow),
    }
    if per_frame:
        frame_scores = result.frame_scores.cpu().tolist()
        row["per_frame"] = [{"time": t, "score": s * scale + offset} for t, s in zip(times, frame_scores)]
    return row


# --- training -----------------------------------------------------------------------------------


class VideoTrainingSet:
    """Label rows of videos for GenzVQA training, with the interface of the image training set:
    ``rows``, ``failed``, ``len()`` and ``batch(indices) -> (VideoBatch | None, kept indices)``.

    SlowFast features are frozen, so they are computed once per video here; frames (12 per video
    by default, the released LSVQ training setting) are decoded again for each batch, so memory
    stays bounded whatever the set's size. Videos that cannot be decoded are reported once and left
    out. The model's config is pointed at ``slowfast`` (ref and SHA-256), so the saved head names the
    SlowFast it was trained with."""

    def __init__(
        self,
        rows: list,
        model: GenzVQA,
        slowfast: SlowFastFeatures,
        *,
        fps_sub: float | None = None,
        max_frames: int | None = None,
        max_clips: int = 16,
        decoder: str = "auto",
        log: Callable[[str], None] = lambda _: None,
    ):
        model.check_slowfast(slowfast)  # before any decoding: a SlowFast of other widths fails now
        # The head being trained goes with these SlowFast weights: its sidecar will name them.
        model.config.update(slowfast=slowfast.ref, slowfast_sha256=slowfast.identity)
        self.model, self.slowfast, self.log = model, slowfast, log
        if fps_sub is None and max_frames is None:
            max_frames = model.spec.extra.get("training_frames_per_video", 12)
        self.options = {"fps_sub": fps_sub, "max_frames": max_frames, "max_clips": max_clips, "decoder": decoder}
        self.failed: dict = {}
        self.rows, self.features = [], []
        for row in rows:
            try:
                video = load_video_input(str(row.path), model, slowfast, **self.options)
            except InputError as exc:
                self.failed[row.path] = exc.reason
                log(f"diqa: skipping {row.path}: {exc.reason}")
                continue
            self.rows.append(row)
            self.features.append((video.slow, video.fast))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> tuple[VideoBatch | None, list[int]]:
        frames, slow, fast, kept = [], [], [], []
        for i in indices:
            try:  # frames only: the features were computed once, above
                video = load_video_input(str(self.rows[i].path), self.model, None, **self.options)
            except InputError as exc:
                self.log(f"diqa: skipping {self.rows[i].path} in this batch: {exc.reason}")
                continue
            frames.append(video.frames)
            slow.append(self.features[i][0])
            fast.append(self.features[i][1])
            kept.append(i)
        return (VideoBatch(frames, slow, fast) if kept else None), kept
