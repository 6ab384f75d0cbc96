"""MAP estimation in EDICT-inverted diffusion latents with a no-reference quality prior.

Zhang, Li, Zhai, Yang, Ma, "When No-Reference Image Quality Models Meet MAP Estimation in
Diffusion Latents", arXiv 2403.06406. No official code was released; the recipe follows the paper's
description and a third-party NTIRE 2025 entry that reuses it (see docs and methods.md §4):

1. the image (at the backbone's resolution) is VAE-encoded, posterior mean, to ``z``;
2. EDICT inverts the pair (z, z) through ``inversion_steps`` DDIM steps with the unconditional
   (empty prompt) context to the noise pair (x_T, y_T) (:mod:`diqa_cli.enhance.edict`);
3. an offset δ shared by both latents ("tied" latents) is optimised by gradient ascent on

       J(δ) = mean over the pair of [ prior(x) - λ · fidelity(x, input) ]

   where x is the VAE decoding of each latent of ``EDICT-generate(x_T + δ, y_T + δ)``, the
   prior is a registered quality model's reported score (higher is better) and λ is
   ``fidelity_weight`` (20, as in the reference recipe); fidelity is NLPD by default;
4. each step clips the gradient per element to ±``clip``, accumulates it with momentum
   (``b ← momentum·b + g``) and moves δ by ``lr·b`` (the recipe's SGD: 1e-3, 0.9, 2); because
   the clip binds for almost every element, a step moves each latent element by at most
   ``lr·clip`` (2e-3), up to ten times that once momentum builds up;
5. the result is the iterate with the highest J seen (the MAP estimate), which is the decoded
   reconstruction of the input when no step helps.

Departures from the reference recipe, each deliberate:
  * The pair is tied by one shared offset δ. The NTIRE code instead replaces the pair by its
    mean after the first step, which moves away from the exact inversion before any gradient
    has been followed; with δ, zero steps give back the input's reconstruction exactly.
  * Early stopping: when the prior score of the decoded image has not beaten its best for
    ``patience`` iterations (the NTIRE code stops when a score mapped to 0-100 reaches 90, a
    threshold tied to its own priors' scales).
  * The prior's own reported scale is used (raw x scale + offset from the checkpoint sidecar),
    not a logistic mapping fitted to MOS, which diqa's heads do not carry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from diqa_cli.enhance.edict import DEFAULT_MIX, ddim_schedule, edict_generate, edict_invert, unet_noise_predictor
from diqa_cli.errors import UsageError

__all__ = ["FIDELITIES", "MapSettings", "MapResult", "MapEnhancer", "build_fidelity"]

FIDELITIES = ("nlpd", "lpips", "mse")


@dataclass(frozen=True)
class MapSettings:
    """Every knob of one enhancement run (recorded in the report as is)."""

    iterations: int = 50
    inversion_steps: int = 50
    mix: float = DEFAULT_MIX
    fidelity: str = "nlpd"
    fidelity_weight: float = 20.0
    lr: float = 2.0
    momentum: float = 0.9
    clip: float = 1e-3
    patience: int = 10  # 0: never stop early
    checkpointing: bool = True
    # Recorded with the results; the loop itself draws no noise, and a prior that does draws it
    # from a generator seeded from its own config (`diqa enhance --seed` sets that).
    seed: int = 0

    def __post_init__(self):
        checks = (
            (self.iterations >= 0, f"--iterations must be 0 or more, got {self.iterations}"),
            (self.inversion_steps >= 1, f"--inversion-steps must be at least 1, got {self.inversion_steps}"),
            (0.0 < self.mix <= 1.0, f"--mix must be in (0, 1], got {self.mix}"),
            (self.fidelity in FIDELITIES, f"--fidelity {self.fidelity!r} is not one of {', '.join(FIDELITIES)}"),
            (self.fidelity_weight >= 0, f"--fidelity-weight must be 0 or more, got {self.fidelity_weight}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.clip > 0, f"--clip must be positive, got {self.clip}"),
            (self.patience >= 0, f"--patience must be 0 (off) or more, got {self.patience}"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MapResult:
    """What one run produced. Images are (3, R, R) float tensors in [0, 1] on the CPU."""

    image: torch.Tensor  # the best iterate, decoded
    reconstruction: torch.Tensor  # iteration 0: the input through encode, invert, generate, decode
    best_iteration: int
    iterations: int  # gradient steps taken
    stop_reason: str  # "iterations", "early-stop" or "interrupted"
    inversion_error: float  # ||x_0 - z|| / ||z|| at iteration 0 (EDICT round trip)
    seconds_inversion: float
    seconds_optimisation: float
    history: list[dict] = field(default_factory=list)  # per evaluated iterate: prior, fidelity, objective

    @property
    def best(self) -> dict:
        return self.history[self.best_iteration]


def build_fidelity(name: str, *, device, offline: bool = False, lpips_weights: str | None = "imagenet"):
    """The fidelity distance by name: ``(x, y) -> (B,)`` for images in [0, 1].

    ``nlpd`` (default, :mod:`diqa_cli.enhance.nlpd`), ``lpips`` (AlexNet LPIPS through
    :class:`diqa_cli.perceptual.LPIPSDistance`, its ImageNet trunk from the weights manifest;
    ``lpips_weights=None`` builds a random trunk, for tests), ``mse`` (mean squared error)."""
    if name == "nlpd":
        from diqa_cli.enhance.nlpd import NLPD

        return NLPD().to(device)
    if name == "lpips":
        from diqa_cli.perceptual import LPIPSDistance

        return LPIPSDistance("alex", backbone_weights=lpips_weights, offline=offline).to(device)
    if name == "mse":
        return lambda x, y: (x - y).square().mean(dim=(1, 2, 3))
    raise UsageError(f"--fidelity {name!r} is not one of {', '.join(FIDELITIES)}")


class MapEnhancer:
    """Runs the MAP loop on one backbone with one prior and one fidelity distance.

    ``backbone`` provides the VAE, U-Net and schedule (:class:`diqa_cli.backbone.Backbone`);
    ``prior`` maps (B, 3, R, R) [0, 1] images to (B,) reported scores, differentiably: a
    :class:`diqa_cli.metric.Metric` (the Python API's own object), which resizes to its method's
    resolution in torch; ``fidelity`` maps two such batches to (B,) distances.
    """

    def __init__(self, backbone, prior, settings: MapSettings, *, fidelity=None, offline: bool = False):
        self.backbone = backbone
        if getattr(prior, "lower_better", False):
            raise UsageError("enhancement climbs the prior's score, so it needs a method where higher is better")
        self.prior = prior
        self.settings = settings
        self.fidelity = fidelity if fidelity is not None else build_fidelity(
            settings.fidelity, device=backbone.device, offline=offline
        )
        self.schedule = ddim_schedule(backbone.alphas_cumprod, backbone.scheduler_config, settings.inversion_steps,
                                      p=settings.mix)
        context = backbone.prompt_embeddings([""])  # unconditional, as the recipe inverts
        self.predict = unet_noise_predictor(
            backbone.unet, context, alphas_cumprod=backbone.alphas_cumprod,
            prediction_type=backbone.scheduler_config.get("prediction_type", "epsilon"),
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((self.backbone.decode(latents) + 1) / 2).clamp(0, 1).float()

    def run(self, pixels: torch.Tensor, *, progress: Callable[[str, int, int, dict | None], None] | None = None) -> MapResult:
        """Enhance one image: ``pixels`` is (1, 3, R, R) in [0, 1] at the backbone's resolution.

        ``progress(phase, done, total, record)`` is called after each inversion step
        (phase "invert", record None) and each evaluated iterate (phase "optimise"). Ctrl-C
        during the optimisation stops it and returns the best iterate so far
        (``stop_reason="interrupted"``); during the inversion it propagates.
        """
        settings = self.settings
        backbone = self.backbone
        if pixels.ndim != 4 or pixels.shape[0] != 1:
            raise ValueError(f"MapEnhancer.run takes one image, (1, 3, R, R); got {tuple(pixels.shape)}")
        target = pixels.to(backbone.device, torch.float32)

        started = time.perf_counter()
        with torch.no_grad():
            z = backbone.encode(target * 2 - 1)
        steps = len(self.schedule)
        x_t, y_t = edict_invert(
            z, self.predict, self.schedule,
            progress=None if progress is None else lambda done: progress("invert", done, steps, None),
        )
        seconds_inversion = time.perf_counter() - started

        started = time.perf_counter()
        delta = torch.zeros_like(x_t, requires_grad=True)
        velocity = torch.zeros_like(x_t)
        history: list[dict] = []
        best_index, best_prior, since_best_prior = 0, -float("inf"), 0
        best_image = reconstruction = None
        inversion_error = float("nan")
        stop_reason = "iterations"
        taken = 0
        try:
            for k in range(settings.iterations + 1):
                last = k == settings.iterations
                with torch.set_grad_enabled(not last):
                    x_0, y_0 = edict_generate(x_t + delta, y_t + delta, self.predict, self.schedule,
                                              checkpointing=settings.checkpointing)
                    decoded = self._decode(torch.cat([x_0, y_0]))
                    prior = self.prior(decoded)
                    distance = self.fidelity(decoded, target.expand_as(decoded)).float()
                    objective = prior - settings.fidelity_weight * distance
                    total = objective.mean()
                record = {
                    "iteration": k,
                    "prior": float(prior[0].detach()),
                    "fidelity": float(distance[0].detach()),
                    "objective": float(objective[0].detach()),
                }
                history.append(record)
                image = decoded[0].detach().cpu()
                if k == 0:
                    reconstruction = image
                    inversion_error = float((x_0.detach() - z).norm() / z.norm().clamp_min(1e-12))
                if best_image is None or record["objective"] > history[best_index]["objective"]:
                    best_index, best_image = k, image
                if progress is not None:
                    progress("optimise", k, settings.iterations, record)
                if record["prior"] > best_prior:
                    best_prior, since_best_prior = record["prior"], 0
                else:
                    since_best_prior += 1
                if last:
                    break
                if settings.patience and since_best_prior >= settings.patience:
                    stop_reason = "early-stop"
                    break
                (grad,) = torch.autograd.grad(total, delta)
                with torch.no_grad():
                    velocity.mul_(settings.momentum).add_(grad.clamp(-settings.clip, settings.clip))
                    delta.add_(velocity, alpha=settings.lr)
                taken += 1
        except KeyboardInterrupt:
            if best_image is None:
                raise
            stop_reason = "interrupted"
        return MapResult(
            image=best_image,
            reconstruction=reconstruction,
            best_iteration=best_index,
            iterations=taken,
            stop_reason=stop_reason,
            inversion_error=inversion_error,
            seconds_inversion=seconds_inversion,
            seconds_optimisation=time.perf_counter() - started,
            history=history,
        )
