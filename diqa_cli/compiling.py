"""``--compile``: torch.compile (inductor) of a scoring model's heavy parts, in place.

What is compiled: each U-Net's down, mid and up blocks, the VAE's encoder and decoder, and every
other direct submodule of the model (heads, adapters, a backbone-free network). Blocks rather than
whole U-Nets, because feature taps (``diqa_cli.taps``) hook block outputs and end a pass early by
raising from a hook: a block's ``forward`` is replaced by its compiled version, so hooks still run
around it, uncompiled.

Compiling happens on the first batch, which :func:`compile_model` runs itself (zeros at the batch
size to come), so a failure is one usage error before any input is scored, and the compile time is
paid up front (logged). Inductor's artefacts are cached under ``DIQA_HOME/compile`` (unless
``TORCHINDUCTOR_CACHE_DIR`` says otherwise), so a later run with the same model and shapes mostly
loads them. On the CPU inductor needs a C++ compiler (``$CXX``, ``g++`` or ``clang++``); on CUDA,
Triton.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from diqa_cli.errors import UsageError, one_line

__all__ = ["compile_model", "compiled_modules"]

log = logging.getLogger("diqa")
_MARK = "_diqa_compiled"  # the model's list of compiled modules, in its __dict__


def compiled_modules(model) -> list:
    """The modules :func:`compile_model` replaced the ``forward`` of (empty if none)."""
    return list(model.__dict__.get(_MARK, []))


def _targets(model) -> list:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unets = [m for m in model.modules() if isinstance(m, UNet2DConditionModel)]
    vaes = [m for m in model.modules() if isinstance(m, AutoencoderKL)]
    backbone = model.backbone
    if backbone is not None:
        if not next(backbone.unet.parameters()).is_meta:
            unets.append(backbone.unet)
        vaes.append(backbone.vae)
    targets = []
    for unet in {id(u): u for u in unets}.values():
        targets += [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    for vae in {id(v): v for v in vaes}.values():
        targets += [vae.encoder, vae.decoder]
    skip = {id(u) for u in unets} | {id(v) for v in vaes}
    targets += [child for child in model.children() if id(child) not in skip]
    return targets


def _check_toolchain(device) -> None:
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError("--compile on CUDA needs Triton (pip install triton); or drop --compile")
        return
    if device.type != "cpu":
        raise UsageError(f"--compile supports the CPU and CUDA, not {device.type}; drop --compile")
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        raise UsageError(
            f"--compile on the CPU needs a C++ compiler ({' or '.join(compilers)} not found on PATH; "
            "install one or set CXX), or drop --compile"
        )


def _cache_dir(ours) -> str:
    """The user's ``TORCHINDUCTOR_CACHE_DIR`` if they set one, else ``ours``. Importing diffusers
    already sets the variable to inductor's default (a temp folder), so that value counts as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = os.path.abspath(default_cache_dir())
    except ImportError:  # a torch that moved it: only an unset variable is ours to set
        default = None
    if current is None or os.path.abspath(current) == default:
        return str(ours)
    return current


def compile_model(model, *, batch_size: int = 1) -> None:
    """Compile ``model``'s heavy parts in place (see the module docstring) and run one batch of
    ``batch_size`` zero images so compilation happens now. Once per model; a second call does
    nothing. Results equal the eager model's within floating-point reordering."""
    if model.__dict__.get(_MARK):
        return
    import torch

    device = model.device
    _check_toolchain(device)
    from diqa_cli.home import subdir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache_dir(subdir("compile"))
    targets = _targets(model)
    for module in targets:
        module.forward = torch.compile(module.forward)
    model.__dict__[_MARK] = targets
    side = model.resolution
    started = time.perf_counter()
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, 3, side, side, device=device, dtype=model.dtype))
    except Exception as exc:  # noqa: BLE001 - any compiler failure becomes one usage error
        for module in targets:
            del module.forward
        model.__dict__.pop(_MARK)
        raise UsageError(f"--compile: torch.compile failed ({one_line(exc)}); run without --compile") from None
    log.info("compiled %d modules of %s in %.1f s (cache: %s)", len(targets), model.method_name,
             time.perf_counter() - started, os.environ["TORCHINDUCTOR_CACHE_DIR"])
