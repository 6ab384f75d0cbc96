"""Speed levers on DP-IQA at real size (SD 1.5-sized random U-Net and VAE, 512 px), each against
the same model without it, alternated round by round in one process; medians.

Configurations (``--levers``, comma-separated; ``baseline`` always runs):

* ``baseline``: diffusers' default attention processors and the text adapter run on every call:
  how diqa scored before the shared-context lever (the model is put in train mode under no_grad
  for it, which only switches the context cache off: DP-IQA has no dropout or batch norm);
* ``shared_context`` (kept, diqa's default): the prompt context after the text adapter computed
  once per model, and each cross-attention layer's keys and values of it projected once
  (``models.xattn.SharedContextAttnProcessor``);
* ``channels_last``: ``shared_context`` with the model's weights and the input in channels-last
  memory format;
* ``no_sdpa``: ``shared_context`` less PyTorch's fused attention (diffusers' ``AttnProcessor``,
  the softmax materialised): what the SDPA kernels give;
* ``compile``: ``shared_context`` with ``diqa_cli.compiling.compile_model`` (torch.compile of the
  U-Net's blocks and the heads); its one-time compile is timed apart.

Printed per configuration: seconds per image (median over rounds), GFLOP per image (counted for
``baseline`` and ``shared_context``; the others run the same arithmetic, and the counter misses
oneDNN's channels-last convolutions),
the largest score difference from ``baseline`` (numerics: zero where the computation is the
same), and the speedup over ``baseline``. Scores mean nothing (random weights; synthetic pixels).

Usage: python bench/bench_levers.py [--device auto] [--dtype auto] [--batch-size 1] [--repeats 3]
       [--levers shared_context,channels_last,no_sdpa] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import progress, report  # noqa: E402
from bench_real import _sync, count_flops, prepare  # noqa: E402

LEVERS = ("shared_context", "channels_last", "no_sdpa", "compile")


def _set_cross_processors(model, factory) -> None:
    from diqa_cli.models.xattn import cross_attention_layer_names

    modules = dict(model.unet.named_modules())
    for name in cross_attention_layer_names(model.unet):
        modules[name].set_processor(factory())


def _set_all_processors(model, factory) -> None:
    model.unet.set_attn_processor(factory())


def _eager(compiled: dict) -> None:
    """Back to the eager forwards (the compiled ones stay in ``compiled`` for the next round)."""
    for module in compiled:
        del module.forward


@contextlib.contextmanager
def configured(model, name: str, pixels):
    """The model and input as configuration ``name`` runs them; restored to diqa's default after."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from diqa_cli.models.xattn import SharedContextAttnProcessor

    try:
        if name == "baseline":
            _set_all_processors(model, AttnProcessor2_0)
            model.train()  # no_grad outside: only the context cache is off (no dropout, no batch norm)
        elif name == "channels_last":
            import torch

            model.to(memory_format=torch.channels_last)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        elif name == "no_sdpa":
            _set_all_processors(model, AttnProcessor)
            _set_cross_processors(model, SharedContextAttnProcessor)  # only the kernel differs
        yield pixels
    finally:
        import torch

        model.eval()
        if name == "channels_last":
            model.to(memory_format=torch.contiguous_format)
        if name in ("baseline", "no_sdpa"):
            _set_all_processors(model, AttnProcessor2_0)
            _set_cross_processors(model, SharedContextAttnProcessor)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levers", default="shared_context,channels_last,no_sdpa")
    parser.add_argument("--work", help="folder for the written networks (kept; shared with bench_real.py)")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64 px (a dry run)")
    args = parser.parse_args()
    levers = [name for name in args.levers.split(",") if name]
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        parser.error(f"--levers: unknown {', '.join(unknown)}; choose from {', '.join(LEVERS)}")

    import torch

    from diqa_cli.backbone import resolve_device, resolve_dtype
    from diqa_cli.methods import get_method

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec = get_method("dpiqa")
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DIQA_HOME", str(work / "home"))
        prepare(work, [spec], args.quick, args.batch_size)
        from bench_real import build_image_model

        model = build_image_model(spec, work, quick=args.quick, device=device, dtype=dtype)
        side = model.resolution
        pixels = torch.rand(args.batch_size, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)

        def score(x):
            with torch.no_grad():
                out = model(x)
            _sync(device)
            return out

        names = ["baseline", *levers]
        compiled = None
        flops, scores, times = {}, {}, {name: [] for name in names}
        for name in names:  # first passes of each: a warm-up, the FLOP count and the scores
            progress(f"{name}: counting FLOPs (warm-up)")
            if name == "compile":
                from diqa_cli.compiling import compile_model, compiled_modules

                started = time.perf_counter()
                compile_model(model, batch_size=args.batch_size)
                report(bench="levers", lever="compile", compile_s=time.perf_counter() - started)
                compiled = {module: module.forward for module in compiled_modules(model)}
            with configured(model, name, pixels) as x:
                score(x)  # warm: a kept context is counted as later batches see it (already there)
                if name in ("baseline", "shared_context"):
                    flops[name] = count_flops(lambda: score(x), model)[0] / args.batch_size
                scores[name] = score(x).float().cpu()
            if name == "compile":
                _eager(compiled)
        for rep in range(args.repeats):
            for name in names:
                progress(f"round {rep + 1}/{args.repeats}: {name}")
                if name == "compile":
                    for module, forward in compiled.items():
                        module.forward = forward
                with configured(model, name, pixels) as x:
                    started = time.perf_counter()
                    score(x)
                    times[name].append((time.perf_counter() - started) / args.batch_size)
                if name == "compile":
                    _eager(compiled)
        base = statistics.median(times["baseline"])
        for name in names:
            seconds = statistics.median(times[name])
            report(bench="levers", method="dpiqa", lever=name, size=f"{side}px", batch=args.batch_size,
                   repeats=args.repeats, device=device, dtype=str(dtype).replace("torch.", ""),
                   s_per_image=seconds,
                   gflop_per_image=flops[name] / 1e9 if name in flops else "as_shared_context",
                   max_abs_score_diff_vs_baseline=float((scores[name] - scores["baseline"]).abs().max()),
                   speedup_vs_baseline=f"{base / seconds:.3f}", images="random_pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
