"""`diqa enhance` cost: seconds per MAP iteration and peak memory, with and without activation
checkpointing of the EDICT chain, measured side by side in one run.

Default: the tiny random backbone (``diqa_cli.tiny``) at 64 px with a DP-IQA head from its tiny
config as the prior, on the CPU. ``--sd`` instead builds Stable Diffusion 1.5-sized random U-Net
and VAE from the shipped ``sd15`` configs at 512 px (meant for a GPU); its prior is a stand-in
(the image's mean squared Laplacian, a sharpness score) and its context a fixed random
embedding, because the quality heads need their text encoders and prompt features; the EDICT
chain, which dominates the cost, is the real one.

One iteration is a generation through every EDICT step, the VAE decode of the latent pair, the
prior and the fidelity (NLPD), the backward pass through all of it, and the update; its time is
the median interval between successive iterates. Peak memory is what the optimisation adds on
top of the loaded models and the inverted latents: on CUDA ``torch.cuda.max_memory_allocated``;
on the CPU the process's resident memory sampled every 2 ms, each configuration in its own
process so that memory freed by one does not hide the next one's. A configuration that runs
out of memory is reported as such. The networks are random: the numbers are costs, not quality.

Usage: python bench/bench_enhance.py [--steps 10] [--iterations 3] [--sd] [--device auto] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = {"checkpointing": True, "no checkpointing": False}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    """Highest resident memory since the last ``reset()``, sampled every 2 ms."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def reset(self):
        with self._lock:
            self.peak = self.start = _rss_bytes()

    def _sample(self):
        while not self._stop.wait(0.002):
            with self._lock:
                self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.peak = max(self.peak, _rss_bytes())
        return False


def _sharpness_prior(resolution: int):
    """Stand-in prior for ``--sd``: mean squared Laplacian of the luminance (differentiable)."""
    import torch

    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]

    class Sharpness:
        resample = "bicubic"

        def __init__(self):
            self.resolution = resolution

        def __call__(self, pixels):
            luma = (pixels * pixels.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            edges = torch.nn.functional.conv2d(luma.float(), kernel.to(pixels.device))
            return edges.square().mean(dim=(1, 2, 3)) * 100

    return Sharpness()


def _sd_backbone(device, dtype, size: int):
    """SD 1.5-sized random U-Net and VAE from the shipped configs (no weights, no text encoder),
    working at ``size`` px."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diqa_cli.backbone import CONFIG_ROOT, Backbone

    root = CONFIG_ROOT / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
    for module in (unet, vae):
        module.to(device, dtype).eval().requires_grad_(False)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    alphas = DDPMScheduler(**{k: scheduler_config[k] for k in keys}).alphas_cumprod.to(device, torch.float32)
    backbone = Backbone(
        ref="random-sd15", identity="random", vae=vae, unet=unet, scheduler_config=scheduler_config,
        device=device, dtype=dtype, resolution=size, vae_scale_factor=8, alphas_cumprod=alphas,
    )
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    backbone.prompt_embeddings = lambda prompts: context.to(device, dtype)  # stand-in for the empty prompt
    return backbone, _sharpness_prior(size)


def _tiny_backbone(device, dtype, folder: Path):
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.metric import Metric
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.tiny import write_tiny_backbone

    if not (folder / "backbone").is_dir():
        write_tiny_backbone(folder)
    backbone = load_backbone(str(folder / "backbone"), device=device, dtype=dtype, offline=True)
    torch.manual_seed(4)
    return backbone, Metric(DPIQA(backbone, **DPIQA.tiny_config()), {"score_normalisation": {"offset": 0.0, "scale": 1.0}})


def _photo(resolution: int):
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


_BUILT: dict = {}  # on CUDA both configurations run in one process: build the networks once


def measure(args, checkpointing: bool, folder: Path) -> dict:
    """One configuration in this process: {'seconds_per_iteration', 'peak_bytes', ...} or {'error'}."""
    import torch

    from diqa_cli.backbone import resolve_device, resolve_dtype
    from diqa_cli.enhance.map import MapEnhancer, MapSettings

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if not _BUILT:
        _BUILT["networks"] = _sd_backbone(device, dtype, args.size) if args.sd else _tiny_backbone(device, dtype, folder)
    backbone, prior = _BUILT["networks"]
    settings = MapSettings(inversion_steps=args.steps, iterations=args.iterations, patience=0, checkpointing=checkpointing)
    enhancer = MapEnhancer(backbone, prior, settings)
    pixels = _photo(backbone.resolution)

    stamps: list[float] = []
    cuda = device.type == "cuda"
    rss = _RssPeak()
    baseline = 0

    def progress(phase, done, total, record):
        nonlocal baseline
        if cuda:
            torch.cuda.synchronize()
        if phase == "invert" and done == total:  # measure the optimisation alone
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device)
            else:
                rss.reset()
        if phase == "optimise":
            stamps.append(time.perf_counter())

    try:
        with rss:
            result = enhancer.run(pixels, progress=progress)
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory ({str(exc).splitlines()[0][:80]})"}
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else rss.peak - rss.start
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_iteration": statistics.median(intervals), "peak_bytes": peak,
            "inversion_error": result.inversion_error, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "resolution": backbone.resolution}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="EDICT steps (inversion and each generation)")
    parser.add_argument("--iterations", type=int, default=3, help="gradient steps per configuration")
    parser.add_argument("--sd", action="store_true", help="SD 1.5-sized random networks (GPU)")
    parser.add_argument("--size", type=int, default=512, help="image side with --sd (a multiple of 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--one", choices=sorted(MODES), help=argparse.SUPPRESS)  # a child process's configuration
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (one interval between iterates)")

    if args.one:
        print(json.dumps(measure(args, MODES[args.one], Path(args.folder))))
        return

    from diqa_cli.backbone import resolve_device

    on_cuda = resolve_device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DIQA_HOME", str(Path(tmp) / "home"))
        results = {}
        for name, checkpointing in MODES.items():
            if on_cuda:
                import torch

                results[name] = measure(args, checkpointing, Path(tmp))
                torch.cuda.empty_cache()
            else:
                command = [sys.executable, __file__, "--one", name, "--folder", tmp, "--steps", str(args.steps),
                           "--iterations", str(args.iterations), "--device", args.device, "--dtype", args.dtype]
                if args.sd:
                    command += ["--sd", "--size", str(args.size)]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{name}: the measuring process failed:\n{done.stderr[-2000:]}")
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    info = next((r for r in results.values() if "device" in r), {})
    what = "SD 1.5-sized random U-Net/VAE, sharpness stand-in prior" if args.sd else "tiny random backbone, tiny DP-IQA head as prior"
    print(f"diqa enhance: {what}, {info.get('resolution', '?')} px, {args.steps} EDICT steps, "
          f"{args.iterations} iterations, {info.get('device', args.device)} {info.get('dtype', '')}")
    print(f"{'':18s} {'s/iteration':>12s} {'peak memory':>14s} {'EDICT round trip':>17s}")
    for name, result in results.items():
        if "error" in result:
            print(f"{name:18s} {result['error']}")
        else:
            print(f"{name:18s} {result['seconds_per_iteration']:12.3f} {result['peak_bytes'] / 2**20:10.1f} MiB "
                  f"{result['inversion_error']:17.1e}")
    with_cp, without = results["checkpointing"], results["no checkpointing"]
    if "error" in with_cp or "error" in without:
        print("time ratio n/a (a configuration failed)")
        print("memory ratio n/a (a configuration failed)")
        return
    print(f"time ratio (checkpointing / none) {with_cp['seconds_per_iteration'] / without['seconds_per_iteration']:.2f}")
    print(f"memory ratio (none / checkpointing) {without['peak_bytes'] / max(with_cp['peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
