"""EDICT: an exactly invertible, differentiable DDIM process on a coupled pair of latents.

Wallace, Gokul, Naik, "EDICT: Exact Diffusion Inversion via Coupled Transformations", CVPR 2023.
A DDIM step from timestep t to the next lower one is ``z' = a·z + b·ε(z, t)`` with
``a = sqrt(ᾱ'/ᾱ)`` and ``b = sqrt(1-ᾱ') - sqrt(ᾱ'(1-ᾱ)/ᾱ)``. It cannot be undone exactly
because ε is evaluated at the point being solved for. EDICT carries two latents (x, y) and lets
each one's update read only the *other* one, followed by two mixing layers with weight p:

    x_i = a·x + b·ε(y, t)            y_i = a·y + b·ε(x_i, t)
    x'  = p·x_i + (1-p)·y_i          y'  = p·y_i + (1-p)·x'

Every line is an affine map of one variable given values already known, so the step runs
backwards exactly (the paper's equations, in reverse order), whatever ε is: any U-Net, any
weights, random ones included. Generation starts from (x_T, y_T); inversion of an image latent
starts from (z, z). This module follows the paper's equations; the authors' released code
also swaps the roles of x and y on alternate steps, which diqa does not (both are bijections).

Precision: the pair and the step arithmetic are kept in float64 (float32 on MPS, which has no
float64); only the noise predictor runs in its own dtype. Inversion then generation evaluates
the predictor at inputs that agree to float64 rounding, which cast to the same fp32/fp16 values,
so the round trip is exact to float64 rounding rather than drifting by 1/p per step in fp32.

Timesteps come from diffusers' ``DDIMScheduler`` built from the backbone's scheduler config (its
spacing and step offset); the ᾱ values are the backbone's ``alphas_cumprod``; the clean end of the
chain has ᾱ = 1 when the config sets ``set_alpha_to_one``, else ᾱ at timestep 0, as DDIM does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MIX",
    "EdictSchedule",
    "NoisePredictor",
    "ddim_schedule",
    "unet_noise_predictor",
    "edict_invert",
    "edict_generate",
    "chain_dtype",
]

DEFAULT_MIX = 0.93  # the paper's mixing weight p

# (latents, timestep) -> predicted noise ε, same shape as latents.
NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class EdictSchedule:
    """The DDIM steps of one chain, in generation order (noisiest first).

    ``timesteps[i]`` is the step's U-Net timestep; ``a[i]`` and ``b[i]`` are its DDIM
    coefficients (float64 tensors), ``p`` the mixing weight.
    """

    timesteps: tuple[int, ...]
    a: torch.Tensor
    b: torch.Tensor
    p: float

    def __len__(self) -> int:
        return len(self.timesteps)


def chain_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def ddim_schedule(alphas_cumprod: torch.Tensor, scheduler_config: dict, steps: int, *, p: float = DEFAULT_MIX) -> EdictSchedule:
    """DDIM coefficients for ``steps`` steps over ``alphas_cumprod`` (a backbone's training
    schedule); ``scheduler_config`` supplies the timestep spacing, offset and clean-end ᾱ."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"EDICT needs at least one step, got {steps}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"the EDICT mixing weight p must be in (0, 1], got {p}")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "set_alpha_to_one", "steps_offset", "timestep_spacing")
    scheduler = DDIMScheduler(**{k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None})
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]  # descending
    alphas = alphas_cumprod.detach().to("cpu", torch.float64)
    clean = 1.0 if scheduler.config.set_alpha_to_one else float(alphas[0])
    alpha_t = alphas[timesteps]
    alpha_prev = torch.cat([alphas[timesteps[1:]], torch.tensor([clean], dtype=torch.float64)])
    a = (alpha_prev / alpha_t).sqrt()
    b = (1 - alpha_prev).sqrt() - (alpha_prev * (1 - alpha_t) / alpha_t).sqrt()
    return EdictSchedule(timesteps=tuple(timesteps), a=a, b=b, p=float(p))


def unet_noise_predictor(unet, context: torch.Tensor, *, alphas_cumprod: torch.Tensor | None = None,
                         prediction_type: str = "epsilon") -> NoisePredictor:
    """ε(z, t) from a diffusers ``UNet2DConditionModel`` with a fixed cross-attention
    ``context`` (e.g. the empty-prompt embedding), expanded to the batch. v-prediction U-Nets
    are converted to ε with ``alphas_cumprod`` (ε = sqrt(ᾱ)·v + sqrt(1-ᾱ)·z)."""
    param = next(unet.parameters())
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"EDICT needs an epsilon or v-prediction U-Net, got prediction_type={prediction_type!r}")
    if prediction_type == "v_prediction" and alphas_cumprod is None:
        raise ValueError("a v-prediction U-Net needs alphas_cumprod to convert its output to noise")

    def predict(latents: torch.Tensor, timestep: int) -> torch.Tensor:
        sample = latents.to(param.device, param.dtype)
        ctx = context.to(param.device, param.dtype).expand(sample.shape[0], -1, -1)
        out = unet(sample, timestep, encoder_hidden_states=ctx).sample
        if prediction_type == "v_prediction":
            alpha = alphas_cumprod[timestep].to(out.dtype)
            out = alpha.sqrt() * out + (1 - alpha).sqrt() * sample
        return out

    return predict


def _eps(predict: NoisePredictor, z: torch.Tensor, t: int) -> torch.Tensor:
    return predict(z, t).to(z.dtype)


def _generate_step(x, y, predict: NoisePredictor, t: int, a: float, b: float, p: float):
    x_i = a * x + b * _eps(predict, y, t)
    y_i = a * y + b * _eps(predict, x_i, t)
    x_new = p * x_i + (1 - p) * y_i
    y_new = p * y_i + (1 - p) * x_new
    return x_new, y_new


def _invert_step(x_new, y_new, predict: NoisePredictor, t: int, a: float, b: float, p: float):
    y_i = (y_new - (1 - p) * x_new) / p
    x_i = (x_new - (1 - p) * y_i) / p
    y = (y_i - b * _eps(predict, x_i, t)) / a
    x = (x_i - b * _eps(predict, y, t)) / a
    return x, y


@torch.no_grad()
def edict_invert(latent: torch.Tensor, predict: NoisePredictor, schedule: EdictSchedule,
                 *, progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the process backwards from a clean latent ``z`` (the pair (z, z)) to the noisiest
    timestep; returns ``(x_T, y_T)`` in the chain dtype. ``progress(i)`` after each step."""
    x = latent.detach().to(chain_dtype(latent.device))
    y = x.clone()
    for i in reversed(range(len(schedule))):
        x, y = _invert_step(x, y, predict, schedule.timesteps[i], float(schedule.a[i]), float(schedule.b[i]), schedule.p)
        if progress is not None:
            progress(len(schedule) - i)
    return x, y


def edict_generate(x: torch.Tensor, y: torch.Tensor, predict: NoisePredictor, schedule: EdictSchedule,
                   *, checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the process forwards from ``(x_T, y_T)`` to the clean pair ``(x_0, y_0)``.

    Differentiable with respect to ``x`` and ``y``. With ``checkpointing`` each step is
    recomputed during the backward pass (``torch.utils.checkpoint``) instead of keeping its U-Net
    activations, so memory holds one step's activations plus the pair at each step, whatever
    the number of steps, for about one extra forward pass of the chain.
    """
    from torch.utils.checkpoint import checkpoint

    dtype = chain_dtype(x.device)
    x, y = x.to(dtype), y.to(dtype)
    for i, t in enumerate(schedule.timesteps):
        args = (predict, t, float(schedule.a[i]), float(schedule.b[i]), schedule.p)
        if checkpointing and torch.is_grad_enabled():
            x, y = checkpoint(_generate_step, x, y, *args, use_reentrant=False)
        else:
            x, y = _generate_step(x, y, *args)
    return x, y
