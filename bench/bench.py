"""`make bench`: diqa's scoring pipeline against a naive per-image loop, and the cost of each
image method, measured side by side in one run; then the video, enhance and store benches.

1. Pipeline versus naive loop (DP-IQA). diqa: the model loaded once (``load_scorer``), images
   decoded in threads ahead of batched forward passes (``score_images``). Naive: what a script
   written without diqa does for every file: load the backbone and the head, decode the image
   with Pillow, VAE-encode it, one U-Net call, the head, the score. The naive loop is given
   diqa's own loaders with the prompt-feature cache warm (a naive script would recompute the
   1485 CLIP prompt features on every load), so the speedup is a lower bound. A third loop
   (naive, but the model loaded once) separates what reloading costs from what batching and
   overlapped decoding gain. Runs alternate (A B C A B C ...) so a busy machine slows all
   sides alike: each round scores every image with diqa and a share of them with the naive
   loops; diqa's rate is the median over rounds, the naive rates come from the median time per
   image. Done on the tiny random backbone (``diqa_cli.tiny``) and
   on a Stable Diffusion 1.5-sized random U-Net and VAE at 256 px. At SD size the naive loop's
   reload is timed once (load + first forward pass, minus a warm forward pass) and added per
   image rather than repeated; the output says so.
2. Per method: images per second on the tiny backbone and at SD size (each method's default
   backbone config, random weights, 256 px), and U-Net evaluations per image, counted by a
   forward pre-hook on every U-Net the model calls.
3. ``bench/bench_real.py`` (every method at real size: pipeline over pure compute, MFU, peak
   memory, student over teacher), ``bench_memory.py``, ``bench_video.py``, ``bench_enhance.py``,
   ``bench_store.py`` and ``bench_maps.py`` as subprocesses, each printing its own lines; then one
   ``bench=summary`` line repeats their ratios.

The images are synthetic: crops of scikit-image's bundled photos (``skimage.data``) written as
JPEGs about 512 px on the long side. Every network has random weights, so scores are
meaningless; only the times are. The last line is ``speedup X.XX``: diqa images/s over naive
images/s for DP-IQA on the tiny backbone. Report lines are ``key=value`` on stdout; progress
goes to stderr.

Usage: python bench/bench.py [--quick] [--device auto|cpu|cuda] [--images 48] [--repeats 6]
       [--no-other-benches]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
SYNTHETIC = "synthetic(skimage.data)"
SD_RESOLUTION = 256
IDENTITY = {"offset": 0.0, "scale": 1.0}
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "camera", "cat")
# Other benches, run after this one's own measurements; the options make a short run where a
# script has no --quick of its own.
OTHER_BENCHES = {
    "bench_real.py": [],  # has --quick
    "bench_memory.py": [],
    "bench_video.py": ["--seconds", "2", "--repeats", "1"],
    "bench_enhance.py": ["--steps", "2", "--iterations", "2"],
    "bench_store.py": ["--images", "40"],
    "bench_maps.py": ["--images", "16", "--repeats", "2"],
}
_STARTED = time.perf_counter()  # progress lines show seconds since start


def progress(message: str) -> None:
    print(f"bench: [{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else format(value, ".3g")
    return str(value).replace(" ", "_")


def report(**fields) -> None:
    """One ``key=value`` line on stdout, always saying the images are synthetic."""
    fields.setdefault("images", SYNTHETIC)
    print(" ".join(f"{key}={_value(value)}" for key, value in fields.items()), flush=True)


def cpu_pressure() -> str:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI): other
    processes competing for the cores, which no alternation of runs can fully cancel."""
    try:
        fields = Path("/proc/pressure/cpu").read_text().split("\n")[0].split()
    except OSError:
        return "n/a"
    return next((f.split("=")[1] + "%" for f in fields if f.startswith("avg60=")), "n/a")


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:60] if str(exc).strip() else ""
    return f"error({type(exc).__name__}{': ' + first if first else ''})".replace(" ", "_").replace("=", ":")


# --- inputs ------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, long_side: int = 512) -> list[str]:
    """``count`` distinct JPEGs: crops of scikit-image's photos, a different crop on each pass
    through them, resized so the long side is ``long_side`` (aspect ratios vary, as in a folder
    of photos)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = []
    for name in _PHOTOS:
        pixels = getattr(data, name)()
        photos.append(Image.fromarray(pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1)).convert("RGB"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        inset = (i // len(photos)) * 24 % (min(w, h) // 4)
        crop = photo.crop((inset, inset // 2, w - inset // 2, h - inset))
        scale = long_side / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)
        path = folder / f"photo{i:03d}.jpg"
        crop.save(path, quality=90)
        paths.append(str(path))
    return paths


# --- measuring -----------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def unet_rows(model):
    """Counts the rows (batch entries) of every U-Net call the model makes; ``[count]``."""
    from diffusers import UNet2DConditionModel

    unets = {id(m): m for m in model.modules() if isinstance(m, UNet2DConditionModel)}
    if model.backbone is not None:
        unets[id(model.backbone.unet)] = model.backbone.unet
    count = [0]

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count[0] += sample.shape[0]

    # A pre-hook: feature taps end the U-Net's forward early, so a forward hook would not fire.
    handles = [unet.register_forward_pre_hook(hook, with_kwargs=True) for unet in unets.values()]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def diqa_scores(paths, model, batch_size: int) -> tuple[float, list[float]]:
    """(seconds, raw scores) of diqa's pipeline on ``paths`` with a loaded model."""
    from diqa_cli.scoring import score_images

    started = time.perf_counter()
    rows = list(score_images(paths, model, batch_size=batch_size, workers=2, normalisation=IDENTITY))
    seconds = time.perf_counter() - started
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} image(s) not scored, e.g. {failed[0]['error']}")
    return seconds, [row["raw_score"] for row in rows]


def naive_pixels(path: str, resolution: int, device, dtype):
    """How a script without diqa reads an image: Pillow, bilinear resize, [0, 1], batch of one."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device, dtype)


def naive_score(path: str, model) -> float:
    import torch

    backbone = model.backbone
    with torch.no_grad():
        return float(model(naive_pixels(path, model.resolution, backbone.device, backbone.dtype))[0])


def naive_loop(paths, *, load=None, model=None) -> list[tuple[float, float, float]]:
    """One image at a time, the backbone and head loaded again for every image when ``load`` is
    given; per image ``(seconds, seconds of them spent loading, raw score)``."""
    per_image = []
    for path in paths:
        started = time.perf_counter()
        if load is not None:
            model = load()
        loaded = time.perf_counter()
        score = naive_score(path, model)
        per_image.append((time.perf_counter() - started, loaded - started, score))
    return per_image


def _per_image_rate(records) -> float:
    """Images per second from per-image times: their median, robust to a moment when another
    process took the CPU."""
    return 1.0 / statistics.median(seconds for seconds, _, _ in records)


def _score_diff(diqa_raw: list[float], naive: dict[int, float]) -> float:
    """Largest raw-score difference between the pipeline and the naive loop over the same images
    (different resize code paths and batch sizes, so not zero, but small)."""
    return max(abs(diqa_raw[i] - score) for i, score in naive.items())


def compare(label: str, paths, *, load_diqa, load_naive, repeats: int, batch_size: int, device) -> float:
    """Tiny backbone: diqa (load once + score every image) against naive (reload per image) and
    naive with the model loaded once, alternated; prints the line and returns the speedup.

    Each round runs diqa on all images and the naive loops on a 1/``repeats`` share of them, so
    every image goes through the naive loops once in all; diqa's rate is the median over rounds,
    the naive loops' rates come from the median time per image."""
    progress(f"{label}: warming up")
    warm_model = load_diqa()
    diqa_scores(paths[:batch_size], warm_model, batch_size)
    naive_score(paths[0], warm_model)
    runs, loads, reloading, once, naive_raw = [], [], [], [], {}
    for rep in range(repeats):
        share = list(range(rep, len(paths), repeats))
        progress(f"{label}: round {rep + 1}/{repeats}: diqa, {len(paths)} images")
        started = time.perf_counter()
        model = load_diqa()
        _sync(device)
        load_s = time.perf_counter() - started
        score_s, diqa_raw = diqa_scores(paths, model, batch_size)
        del model
        runs.append((load_s + score_s, score_s))
        loads.append(load_s)
        progress(f"{label}: round {rep + 1}/{repeats}: naive, {len(share)} images, reloading per image")
        records = naive_loop([paths[i] for i in share], load=load_naive)
        reloading += records
        naive_raw.update(zip(share, (score for _, _, score in records)))
        progress(f"{label}: round {rep + 1}/{repeats}: naive, {len(share)} images, loaded once")
        once += naive_loop([paths[i] for i in share], model=warm_model)
    diqa = len(paths) / statistics.median(total for total, _ in runs)
    steady = len(paths) / statistics.median(score for _, score in runs)
    naive, naive_once = _per_image_rate(reloading), _per_image_rate(once)
    report(
        bench="pipeline", backbone=label, method="dpiqa", n=len(paths), repeats=repeats, batch_size=batch_size,
        resolution=warm_model.resolution,
        diqa_img_per_s=diqa, naive_img_per_s=naive, speedup=f"{diqa / naive:.2f}",
        diqa_steady_img_per_s=steady, naive_loaded_once_img_per_s=naive_once,
        speedup_batching_and_overlap=f"{steady / naive_once:.2f}",
        diqa_load_s=statistics.median(loads),
        naive_reload_s_per_image=statistics.median(load for _, load, _ in reloading),
        max_abs_raw_score_diff=_score_diff(diqa_raw, naive_raw),
    )
    return diqa / naive


# --- Stable Diffusion-sized random networks ------------------------------------------------------


def write_random_sd(name: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A diffusers folder with the shipped ``name`` config's U-Net and VAE at full size and random
    weights, and a one-layer text encoder at the real width (it runs once per model, to embed
    the prompts, which are then cached; it does not enter images per second)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diqa_cli.backbone import CONFIG_ROOT

    root = CONFIG_ROOT / name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        unet.save_pretrained(folder / "unet")
        del unet
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        vae.save_pretrained(folder / "vae")
        del vae
        text_config = CLIPTextConfig.from_pretrained(root / "text_encoder", num_hidden_layers=1)
        CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    (folder / "scheduler").mkdir()
    shutil.copy(root / "scheduler" / "scheduler_config.json", folder / "scheduler")
    shutil.copy(root / "model_index.json", folder)
    return folder


def write_random_clip(folder: Path, projection_dim: int, tokenizer_dir: Path) -> Path:
    """A one-layer CLIP text tower at ViT-L/14's width whose projected features have
    ``projection_dim`` (SD 1.5's cross-attention width): DP-IQA's 1485 prompt features come
    from it, once, into the cache."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diqa_cli.backbone import CONFIG_ROOT

    config = CLIPTextConfig.from_pretrained(
        CONFIG_ROOT / "sd15" / "text_encoder", num_hidden_layers=1, projection_dim=projection_dim
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        CLIPTextModelWithProjection(config).save_pretrained(folder)
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    return folder


def sd_compare(paths, *, folder: Path, clip: Path, repeats: int, device, dtype) -> dict:
    """DP-IQA at SD size, 256 px: diqa against the naive loop with its reload timed once and
    added per image. Returns the per-method figures for DP-IQA."""
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.checkpoint import load_head, save_head
    from diqa_cli.models.dpiqa import DPIQA

    head = folder.parent / "dpiqa-sd15-random.safetensors"
    progress("SD 1.5-sized DP-IQA: first load (hashes the weights once), building the head")
    backbone = load_backbone(str(folder), device=device, dtype=dtype, offline=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        # finetune_unet=False: the released model scores with its own fine-tuned copy of the U-Net,
        # which costs the same per image; one copy keeps this run's memory at one SD U-Net.
        model = DPIQA(backbone, clip=str(clip), finetune_unet=False, resolution=SD_RESOLUTION)
    save_head(model, head, normalisation=IDENTITY)
    del model, backbone
    gc.collect()

    def load():
        return load_head(head, device=device, dtype=dtype, offline=True)[0]

    progress("SD 1.5-sized DP-IQA: warming up")
    model = load()
    naive_score(paths[0], model)
    if device.type == "cuda":  # kernel selection for the batch shape (seconds per image on the CPU: skipped)
        diqa_scores(paths, model, len(paths))
    warm_single = []
    for path in paths[:2]:
        tick = time.perf_counter()
        naive_score(path, model)
        warm_single.append(time.perf_counter() - tick)
    del model
    gc.collect()
    # The naive loop's reload: a load from the (warm) page cache plus its first forward pass,
    # which pays what the load left lazy, less what a forward pass costs anyway.
    progress("SD 1.5-sized DP-IQA: timing one reload")
    tick = time.perf_counter()
    model = load()
    naive_score(paths[0], model)
    reload_s = max(0.0, time.perf_counter() - tick - min(warm_single))

    runs, once, naive_raw, rows = [], [], {}, [0]
    for rep in range(repeats):
        share = list(range(rep, len(paths), repeats))
        progress(f"SD 1.5-sized DP-IQA: round {rep + 1}/{repeats}: diqa, {len(paths)} images in one batch")
        with unet_rows(model) as rows:
            score_s, diqa_raw = diqa_scores(paths, model, len(paths))
        runs.append(score_s)
        progress(f"SD 1.5-sized DP-IQA: round {rep + 1}/{repeats}: naive, {len(share)} images one at a time")
        records = naive_loop([paths[i] for i in share], model=model)
        once += records
        naive_raw.update(zip(share, (score for _, _, score in records)))
    steady = len(paths) / statistics.median(runs)
    diqa = len(paths) / (reload_s + statistics.median(runs))
    naive_once = _per_image_rate(once)
    naive = 1.0 / (1.0 / naive_once + reload_s)
    report(
        bench="pipeline", backbone="sd15-sized-random", method="dpiqa", n=len(paths), repeats=repeats,
        batch_size=len(paths), resolution=SD_RESOLUTION,
        diqa_img_per_s=diqa, naive_img_per_s=naive, speedup=f"{diqa / naive:.2f}",
        diqa_steady_img_per_s=steady, naive_loaded_once_img_per_s=naive_once,
        speedup_batching_and_overlap=f"{steady / naive_once:.2f}",
        naive_reload_s_per_image=reload_s, naive_reload="timed_once_and_added_per_image",
        max_abs_raw_score_diff=_score_diff(diqa_raw, naive_raw),
    )
    result = {"img_per_s": steady, "n": len(paths), "unet_evals": rows[0] / len(paths)}
    del model
    gc.collect()
    return result


def sd_method(spec, backbone, paths, *, device, dtype, overrides: dict) -> dict:
    """One method at SD size, 256 px, random weights, scored through the pipeline once."""
    import torch

    from diqa_cli.methods import load_model_class

    cls = load_model_class(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = cls(backbone, resolution=SD_RESOLUTION, **overrides)
    if backbone is None:
        model.to(device, dtype)
    model.eval()
    if device.type == "cuda" or backbone is None:
        # The first call pays kernel selection and allocator growth. On the CPU, where one image
        # through SD-sized U-Net passes takes tens of seconds, that set-up is a small share and
        # a warm-up pass is not worth its time; a backbone-free network runs in about a second,
        # so there it is not.
        diqa_scores(paths[:1], model, 1)
    with unet_rows(model) as rows:
        score_s, _ = diqa_scores(paths, model, len(paths))
    return {"img_per_s": len(paths) / score_s, "n": len(paths), "unet_evals": rows[0] / len(paths)}


# --- tiny: per method ----------------------------------------------------------------------------


def tiny_methods(specs, heads: Path, paths, *, repeats: int, batch_size: int, device, dtype) -> dict:
    """Every image method's tiny head, loaded once, scored round-robin ``repeats`` times."""
    from diqa_cli.scoring import load_scorer

    models, results = {}, {}
    for spec in specs:
        try:
            model, _ = load_scorer(None, checkpoint=str(heads / f"{spec.name}.safetensors"),
                                   device=device, dtype=dtype, offline=True)
            diqa_scores(paths[:2], model, batch_size)  # warm-up
            models[spec.name] = model
        except Exception as exc:  # noqa: BLE001 - a broken method is reported, the others still run
            results[spec.name] = {"error": _error(exc)}
    rates: dict[str, list[float]] = {name: [] for name in models}
    evals: dict[str, float] = {}
    for rep in range(repeats):
        for name, model in models.items():
            progress(f"tiny {name}: round {rep + 1}/{repeats}")
            with unet_rows(model) as rows:
                seconds, _ = diqa_scores(paths, model, batch_size)
            rates[name].append(len(paths) / seconds)
            evals[name] = rows[0] / len(paths)
    for name in models:
        results[name] = {"img_per_s": statistics.median(rates[name]), "n": len(paths), "unet_evals": evals[name]}
    return results


# --- the other benches ---------------------------------------------------------------------------


def run_other_benches(quick: bool, device: str) -> list[str]:
    """Run each other bench script in its own process; returns the names of those that failed."""
    failed = []
    for script, short_options in OTHER_BENCHES.items():
        path = HERE / script
        if not path.exists():
            report(subbench=script, status="missing")
            continue
        source = path.read_text()
        options = []
        if quick:
            options = ["--quick"] if '"--quick"' in source else short_options
        if '"--device"' in source:
            options += ["--device", device]
        report(subbench=script, options=",".join(options) or "defaults")
        progress(f"running {script} {' '.join(options)}")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(path), *options], check=False, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        RATIOS.update(_ratios(script, done.stdout))
        status = "ok" if done.returncode == 0 else f"failed(rc={done.returncode})"
        if done.returncode:
            failed.append(script)
        report(subbench=script, status=status, seconds=time.perf_counter() - started)
    return failed


RATIOS: dict[str, str] = {}  # the summary's ratios, gathered from the other benches' output


def _ratios(script: str, stdout: str) -> dict[str, str]:
    """The ratios the summary repeats: bench_real's summary line (pipeline over pure compute,
    MFU, student over teacher, diqa over released) and bench_memory's peak-memory ratio."""
    found = {}
    for line in stdout.splitlines():
        if script == "bench_real.py" and line.startswith("bench=real_summary "):
            found.update(field.split("=", 1) for field in line.split()[1:] if not field.startswith("images="))
        if script == "bench_memory.py" and line.startswith("ratio peak memory after/before:"):
            found["memory_one_unet_over_two"] = line.split(":", 1)[1].strip()
    return found


# --- main ----------------------------------------------------------------------------------------


# Per-method settings at SD size that keep the run offline: random perceptual networks for LGDM
# (its ImageNet VGG weights come only through the weights manifest), the written CLIP for DP-IQA.
def _sd_overrides(name: str, clip: Path) -> dict:
    return {
        "dpiqa": {"clip": str(clip), "finetune_unet": False},
        "lgdm": {"perceptual_backbone_weights": None},
    }.get(name, {})


def sd_stage(specs, paths, *, root: Path, tokenizer: Path, sd_images: int, method_images: int, repeats: int,
             device, dtype) -> dict:
    """Every image method at SD size, 256 px: DP-IQA through :func:`sd_compare`, the others on
    their default backbone config (each SD-sized backbone written, loaded and freed in turn).
    ``device`` and ``dtype`` are resolved torch objects (the backbone loaders take those too)."""
    from diqa_cli.backbone import load_backbone

    progress("writing an SD 1.5-sized random backbone (3.8 GB in fp32)")
    sd15 = write_random_sd("sd15", root / "sd15", tokenizer)
    clip = write_random_clip(root / "clip", 768, tokenizer)
    results = {"dpiqa": sd_compare(paths[:sd_images], folder=sd15, clip=clip, repeats=repeats,
                                   device=device, dtype=dtype)}
    by_config: dict[str | None, list] = {}
    for spec in specs:
        if spec.name != "dpiqa":
            config = spec.default_backbone if spec.extra.get("needs_backbone", True) else None
            by_config.setdefault(config, []).append(spec)
    for config, group in by_config.items():
        backbone = None
        if config is not None:
            folder = sd15 if config == "sd15" else write_random_sd(config, root / config, tokenizer)
            backbone = load_backbone(str(folder), device=device, dtype=dtype, offline=True)
        for spec in group:
            progress(f"SD-sized {spec.name} ({config or 'no diffusion backbone'}), {method_images} image(s)")
            try:
                results[spec.name] = sd_method(spec, backbone, paths[:method_images], device=device, dtype=dtype,
                                               overrides=_sd_overrides(spec.name, clip))
            except Exception as exc:  # noqa: BLE001 - reported on the method's line
                results[spec.name] = {"error": _error(exc)}
            gc.collect()
        del backbone
        gc.collect()
        if config not in (None, "sd15"):
            shutil.rmtree(root / config)
    return results


def report_methods(specs, tiny: dict, sd: dict, quick: bool) -> None:
    from diqa_cli.methods import list_methods

    for spec in specs:
        small, big = tiny.get(spec.name, {}), sd.get(spec.name, {})
        needs_backbone = spec.extra.get("needs_backbone", True)
        report(
            method=spec.name,
            tiny_img_per_s=small.get("error", small.get("img_per_s")), tiny_images=small.get("n", 0),
            sd256_img_per_s="skipped(--quick)" if quick else big.get("error", big.get("img_per_s")),
            sd256_images=big.get("n", 0),
            sd256_model=(f"{spec.default_backbone}-sized_random" if needs_backbone
                         else "released_architecture_random(no_diffusion_backbone)"),
            unet_evals_per_image=small.get("unet_evals", big.get("unet_evals", "n/a")),
        )
    for spec in list_methods("video"):
        report(method=spec.name, note="video_method:see_bench_video.py_below", images="synthetic_clip(skimage.data)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, tiny backbone only, short other benches")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (fp16 on CUDA)")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--images", type=int, help="images in the tiny comparison (default 48; --quick 16)")
    parser.add_argument("--method-images", type=int, help="images per method, tiny backbone (default 16; --quick 8)")
    parser.add_argument("--sd-images", type=int, help="DP-IQA images at SD size (default 4 on CPU, 32 on CUDA)")
    parser.add_argument("--sd-method-images", type=int,
                        help="images per other method at SD size (default 1 on CPU, 8 on CUDA)")
    parser.add_argument("--repeats", type=int, help="alternated rounds (default 6, at SD size 2; --quick 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="diqa's batch size on the tiny backbone")
    parser.add_argument("--no-other-benches", action="store_true", help="skip bench_video/enhance/store")
    args = parser.parse_args()
    for name in ("images", "method_images", "sd_images", "sd_method_images", "repeats", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    wall = time.perf_counter()

    import torch

    from diqa_cli.backbone import resolve_device, resolve_dtype
    from diqa_cli.checkpoint import load_head
    from diqa_cli.errors import DiqaError
    from diqa_cli.methods import list_methods
    from diqa_cli.scoring import load_scorer
    from diqa_cli.tiny import write_tiny_bundle

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except DiqaError as exc:
        parser.error(str(exc))
    # The loaders take names (a backbone-free head resolves them itself); "auto" resolves as above.
    device_name, dtype_name = str(device), args.dtype
    cuda = device.type == "cuda"
    n_images = args.images or (16 if args.quick else 48)
    n_method = min(args.method_images or (8 if args.quick else 16), n_images)
    repeats = args.repeats or (4 if args.quick else 6)
    sd_images = args.sd_images or (32 if cuda else 4)

    with tempfile.TemporaryDirectory(prefix="diqa-bench-") as tmp:
        root = Path(tmp)
        os.environ["DIQA_HOME"] = str(root / "home")  # the other benches inherit it
        progress(f"writing {max(n_images, sd_images)} synthetic JPEGs and the tiny bundle")
        paths = write_images(root / "photos", max(n_images, sd_images))
        bundle = write_tiny_bundle(root / "tiny")
        report(
            bench="setup", device=device, dtype=str(dtype).replace("torch.", ""), torch_threads=torch.get_num_threads(),
            cpus=os.cpu_count(), loadavg_1min=os.getloadavg()[0], cpu_pressure_60s=cpu_pressure(),
            jpegs=len(paths), jpeg_long_side_px=512,
            networks="random_weights(scores_meaningless)",
        )

        head = bundle / "heads" / "dpiqa.safetensors"
        speedup = compare(
            "tiny", paths[:n_images],
            load_diqa=lambda: load_scorer(None, checkpoint=str(head), device=device_name, dtype=dtype_name,
                                          offline=True)[0],
            load_naive=lambda: load_head(head, device=device_name, dtype=dtype_name, offline=True)[0],
            repeats=repeats, batch_size=args.batch_size, device=device,
        )
        specs = list_methods("image")
        tiny = tiny_methods(specs, bundle / "heads", paths[:n_method], repeats=repeats,
                            batch_size=args.batch_size, device=device_name, dtype=dtype_name)
        sd = {}
        if not args.quick:
            sd = sd_stage(specs, paths, root=root, tokenizer=bundle / "backbone" / "tokenizer", sd_images=sd_images,
                          method_images=args.sd_method_images or (8 if cuda else 1), repeats=args.repeats or 2,
                          device=device, dtype=dtype)
        report_methods(specs, tiny, sd, args.quick)

        failed = [] if args.no_other_benches else run_other_benches(args.quick, args.device)
        report(bench="total", seconds=time.perf_counter() - wall, quick=args.quick, cpu_pressure_60s=cpu_pressure(),
               other_benches_failed=",".join(failed) or "none")
        if RATIOS:
            report(bench="summary", **RATIOS, speedup_vs_naive_reload_loop=f"{speedup:.2f}")
    print(f"speedup {speedup:.2f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
