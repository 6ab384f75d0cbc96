"""Every method at real size, measured side by side in one run: diqa's pipeline from files to rows
against pure model compute, the model's FLOP/s against the device's peak (MFU), peak memory.

Per method, in its own process (so that peak resident memory is the method's own):

* **pipeline**: ``pipelines.images.score_images`` on JPEG files (decoding threads, batches), the
  way ``diqa score`` runs; for the video method ``pipelines.videos.score_videos`` on an h264 clip;
* **pure compute**: the same model and batch size on tensors already decoded, resized and on the
  device (for the video method: the frames and the SlowFast clips as tensors): the ceiling for
  the pipeline. The two alternate (pipeline, pure, pipeline, pure, ...) and medians are taken, so
  a busy machine slows both alike;
* **FLOPs**: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one batch (the first,
  which also warms up), in total and inside the U-Net; **achieved FLOP/s** = FLOPs / pure time,
  and the U-Net's = U-Net FLOPs / time inside U-Net calls (timed around each call, so early-
  stopped calls count too);
* **peak**: the device's dense matmul rate in the benched dtype, *measured in the same process*
  before every round (a large square matmul on the same threads, best of several; the median over
  rounds), not a datasheet number; MFU is achieved / that peak. On a GPU the datasheet peak is higher than a measured matmul, so this
  MFU is an upper bound of the datasheet one;
* **peak memory**: CUDA ``max_memory_allocated``; on the CPU the process's peak resident memory
  (``ru_maxrss``, weights included).

Ratios printed (one ``key=value`` line each, then one ``summary`` line): ``pipeline_over_pure``
(pipeline images/s over pure-compute images/s, 1.0 = decoding fully hidden), ``student_over_teacher``
(DP-IQA student images/s over the teacher's, pipeline and pure), ``mfu`` and ``unet_mfu``, and
``diqa_over_released``: diqa's pipeline from files to rows against the released code's own
test-time loop, run from a local clone in its own environment (``--released METHOD=CLONE``,
``--released-python``; DP-IQA teacher and student, GenzIQA), on the CPU at 512 px. Both sides run
the same seeded random weights, built by the parity tool (``tools/parity``: the released
checkpoint files, which diqa's side loads converted, as ``diqa score -c`` does) and the same
JPEG files; each side in its own process per round (one model in memory at a time), model loading
not timed, sides alternating (diqa, released, diqa, released, ...) on the same thread count;
medians over rounds. The released loop is its repository's: its dataset transform on the files,
a DataLoader at its test batch size (capped at the images timed), its model's forward (GenzIQA:
VAE encoding, then ``compute_score_genziqa`` with the prompt learner re-encoding the prompts
every batch, as genziqa_test.py does). ``diqa_over_released.METHOD`` is released seconds per
image over diqa's (above 1: diqa faster); each side's seconds inside its model's forward are
reported too (``diqa_over_released_forward``: the models alone, the rest being each loop's
decoding and batching), ``--released-flops`` adds each side's FLOPs per image (one more, untimed
pass), and the scores' largest difference between the sides is reported as a check that both
ran the same weights. Without a clone the line says ``skipped``.

Models: random weights at the real architectures and sizes: SD 1.5's U-Net and VAE for DP-IQA and
LGDM, SD 2.1-base's for GenzIQA and GenzVQA, EfficientNet-B7 for the student, SlowFast R50 for
GenzVQA's clips; 512 px inputs. DP-IQA is built without its own U-Net copy (``finetune_unet=False``):
the released head runs its own fine-tuned U-Net, which costs the same per image. ``--quick`` runs
the tiny bundle's networks instead (64 px; a dry run of the script, numbers meaningless). Images
are synthetic (crops of scikit-image's photos); scores mean nothing, only times do.

Usage: python bench/bench_real.py [--device auto] [--dtype auto] [--methods all|none|M,...] [--batch-size N]
       [--repeats N] [--budget-s 120] [--work DIR] [--quick] [--json FILE]
       [--released METHOD=CLONE ... --released-python PY [--parity-work DIR] [--released-rounds 2]
        [--released-images N]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import SYNTHETIC, progress, report, write_images, write_random_clip, write_random_sd  # noqa: E402

IDENTITY = {"offset": 0.0, "scale": 1.0}
RESOLUTION = 512
STUDENT, TEACHER = "dpiqa-student", "dpiqa"  # the pair the student/teacher ratio compares


# --- peak rate -----------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_flops(device, dtype) -> float:
    """Dense matmul FLOP/s in ``dtype`` on this device and these threads: best of several square
    matmuls (4096 on a GPU, 2048 on a CPU, where a larger one takes seconds)."""
    import torch

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(6 if device.type == "cuda" else 4):
        _sync(device)
        started = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        calls = 5 if device.type == "cuda" else 1
        best = max(best, calls * 2 * n**3 / (time.perf_counter() - started))
    return best


# --- counting and timing -------------------------------------------------------------------------


def _unets(model) -> list:
    from diffusers import UNet2DConditionModel

    found = {id(m): m for m in model.modules() if isinstance(m, UNet2DConditionModel)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not next(backbone.unet.parameters()).is_meta:
        found.setdefault(id(backbone.unet), backbone.unet)
    return list(found.values())


@contextlib.contextmanager
def unet_clock(model, device):
    """Seconds spent inside U-Net calls, ``[seconds, calls]``: the U-Net's ``forward`` is wrapped
    for the block, so a call a feature tap ends early is timed too."""
    record = [0.0, 0]
    patched = []
    for unet in _unets(model):
        original = unet.forward

        def timed(*args, _original=original, **kwargs):
            _sync(device)
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _sync(device)
                record[0] += time.perf_counter() - started
                record[1] += 1

        unet.forward = timed
        patched.append(unet)
    try:
        yield record
    finally:
        for unet in patched:
            del unet.forward  # the instance attribute; the class's forward shows again


def count_flops(run, model) -> tuple[float, float]:
    """(total FLOPs, FLOPs inside U-Net calls) of ``run()``, counted by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inside = [0.0]
    counter = FlopCounterMode(display=False)
    # The U-Net's share: total FLOPs read before and after each U-Net call (forward wrapped, since
    # a feature tap may end the call with an exception, which skips forward hooks).
    originals = {}
    for unet in _unets(model):
        originals[unet] = unet.forward

        def counted(*args, _original=unet.forward, **kwargs):
            start = counter.get_total_flops()
            try:
                return _original(*args, **kwargs)
            finally:
                inside[0] += counter.get_total_flops() - start

        unet.forward = counted
    try:
        with counter, torch.no_grad():
            run()
    finally:
        for unet in originals:
            del unet.forward
    return float(counter.get_total_flops()), inside[0]


def peak_memory(device) -> float:
    """GiB: CUDA's peak allocation since the last reset, else this process's peak resident memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- building the models -------------------------------------------------------------------------


def build_image_model(spec, work: Path, *, quick: bool, device, dtype):
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.methods import load_model_class

    cls = load_model_class(spec)
    needs_backbone = spec.extra.get("needs_backbone", True)
    backbone = None
    if quick:
        config = dict(cls.tiny_config())
        if needs_backbone:
            backbone = load_backbone(str(work / "tiny" / "backbone"), device=device, dtype=dtype, offline=True)
        else:
            config.pop("resolution", None)
            config["resolution"] = 64
    else:
        config = {"resolution": RESOLUTION}
        if needs_backbone:
            backbone = load_backbone(str(work / spec.default_backbone), device=device, dtype=dtype, offline=True)
        config.update({
            "dpiqa": {"clip": str(work / "clip"), "finetune_unet": False},
            "lgdm": {"perceptual_backbone_weights": None},
        }.get(spec.name, {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = cls(backbone, **config)
    if backbone is None:
        model.to(device, dtype)
        from diqa_cli.models.base import BatchNormCalibration

        if isinstance(model, BatchNormCalibration):  # an untrained BatchNorm gives constant scores
            model.set_batchnorm_statistics(torch.rand(4, 3, model.resolution, model.resolution, device=device, dtype=dtype))
    return model.eval().freeze()


# --- one method, in its own process ----------------------------------------------------------------


def measure_image(spec, args, work: Path, device, dtype) -> dict:
    import numpy as np
    import torch

    from diqa_cli.imageio import InputItem, iter_images
    from diqa_cli.pipelines.images import score_images

    model = build_image_model(spec, work, quick=args.quick, device=device, dtype=dtype)
    paths = sorted(str(p) for p in (work / "photos").glob("*.jpg"))
    # Pure compute gets the pipeline's own decoded arrays, already on the device.
    arrays = [a for _, a, _ in iter_images([InputItem(p) for p in paths[: args.max_batch]], model.resolution,
                                           workers=1, resample=spec.resample)]

    def pixels(batch: int):
        return torch.from_numpy(np.stack(arrays[:batch])).to(device=device, dtype=dtype)

    def pure(x):
        with torch.no_grad():
            out = model(x)
        _sync(device)
        return out

    # Warm-up and the FLOP count on one image; its time sets the batch and the rounds on a CPU.
    one = pixels(1)
    started = time.perf_counter()
    flops_one, unet_one = count_flops(lambda: pure(one), model)
    first_s = time.perf_counter() - started
    batch = args.batch_size or _default_batch(device, first_s, len(arrays))
    batch = min(batch, len(arrays))
    x = pixels(batch)
    flops, unet_flops = (flops_one * batch, unet_one * batch)
    if batch > 1:
        pure(x)  # kernel choice and allocator growth for this batch shape
    per_round = 2 * first_s * batch
    repeats = args.repeats or max(1, min(3, int(args.budget_s / max(per_round, 1e-9))))
    batches = args.batches or (4 if device.type == "cuda" else 1)
    files = [paths[i % len(paths)] for i in range(batch * batches)]

    pipe_s, pure_s, unet_s, peaks, unet_calls = [], [], [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for rep in range(repeats):
        peaks.append(measured_peak_flops(device, dtype))
        progress(f"{spec.name}: round {rep + 1}/{repeats}: pipeline, {len(files)} files, batch {batch}")
        started = time.perf_counter()
        rows = list(score_images(files, model, batch_size=batch, workers=2, normalisation=IDENTITY))
        _sync(device)
        pipe_s.append((time.perf_counter() - started) / len(files))
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            raise RuntimeError(f"{len(bad)} file(s) not scored, e.g. {bad[0]['error']}")
        progress(f"{spec.name}: round {rep + 1}/{repeats}: pure compute, {batches} x batch {batch}")
        with unet_clock(model, device) as clock:
            started = time.perf_counter()
            for _ in range(batches):
                pure(x)
            pure_s.append((time.perf_counter() - started) / (batch * batches))
        unet_s.append(clock[0] / (batch * batches))
        unet_calls = clock[1] / batches
    return _result(spec.name, batch=batch, repeats=repeats, pipe_s=pipe_s, pure_s=pure_s, unet_s=unet_s,
                   flops=flops / batch, unet_flops=unet_flops / batch, unet_calls=unet_calls, peak=statistics.median(peaks),
                   device=device, resolution=model.resolution, unit="image")


def _default_batch(device, first_s: float, available: int) -> int:
    """CUDA: what ``--batch-size auto`` picks (free memory over the measured footprint), at most
    the images written; CPU: 1 where one image takes over a second (a larger batch only adds
    minutes at the same rate), else 4."""
    if device.type == "cuda":
        return available
    return 1 if first_s > 1.0 else 4


def measure_video(spec, args, work: Path, device, dtype) -> dict:
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.methods import load_model_class
    from diqa_cli.models.slowfast import SlowFastFeatures, tiny_slowfast_config
    from diqa_cli.pipelines.videos import score_videos

    cls = load_model_class(spec)
    if args.quick:
        backbone = load_backbone(str(work / "tiny" / "backbone"), device=device, dtype=dtype, offline=True)
        config, encoder_config = {k: v for k, v in cls.tiny_config().items() if k != "slowfast"}, tiny_slowfast_config()
    else:
        backbone = load_backbone(str(work / spec.default_backbone), device=device, dtype=dtype, offline=True)
        config, encoder_config = {"resolution": RESOLUTION}, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = cls(backbone, slowfast="random", **config).eval().freeze()
        encoder = SlowFastFeatures(encoder_config)
    encoder.ref = "random"
    encoder.to(device, dtype if device.type == "cuda" else torch.float32)
    frames = args.video_frames or (spec.frames_per_video if device.type == "cuda" else 1)
    clip = work / "clip.mp4"

    def pipeline():
        rows = list(score_videos([str(clip)], model, encoder, normalisation=IDENTITY, max_frames=frames,
                                 batch_size=frames))
        if rows[0]["status"] != "ok":
            raise RuntimeError(f"video not scored: {rows[0]['error']}")
        return rows[0]

    progress(f"{spec.name}: warm-up through the pipeline ({frames} frame(s))")
    row = pipeline()
    side = encoder.crop_size
    pix = torch.rand(row["frames_sampled"], 3, model.resolution, model.resolution, device=device, dtype=dtype)
    clips = torch.rand(row["clips"], 3, encoder.clip_frames, side, side, device=device)

    def pure():
        with torch.no_grad():
            out = model.video_score(model.frame_features(pix), encoder.extract_features(clips)).score
        _sync(device)
        return out

    started = time.perf_counter()
    flops, unet_flops = count_flops(pure, model)
    first_s = time.perf_counter() - started
    repeats = args.repeats or max(1, min(3, int(args.budget_s / max(2 * first_s, 1e-9))))
    pipe_s, pure_s, unet_s, peaks, unet_calls = [], [], [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for rep in range(repeats):
        peaks.append(measured_peak_flops(device, dtype))
        progress(f"{spec.name}: round {rep + 1}/{repeats}: pipeline, one {row['duration']:.0f} s clip")
        started = time.perf_counter()
        pipeline()
        pipe_s.append(time.perf_counter() - started)
        progress(f"{spec.name}: round {rep + 1}/{repeats}: pure compute")
        with unet_clock(model, device) as clock:
            started = time.perf_counter()
            pure()
            pure_s.append(time.perf_counter() - started)
        unet_s.append(clock[0])
        unet_calls = clock[1]
    return _result(spec.name, batch=row["frames_sampled"], repeats=repeats, pipe_s=pipe_s, pure_s=pure_s,
                   unet_s=unet_s, flops=flops, unet_flops=unet_flops, unet_calls=unet_calls, peak=statistics.median(peaks),
                   device=device, resolution=model.resolution, unit="video", clips=row["clips"])


def _result(method, *, batch, repeats, pipe_s, pure_s, unet_s, flops, unet_flops, unet_calls, peak, device,
            resolution, unit, **extra) -> dict:
    pipe, pure = statistics.median(pipe_s), statistics.median(pure_s)
    unet = statistics.median(unet_s)
    return {
        "method": method, "unit": unit, "resolution": resolution, "batch": batch, "repeats": repeats,
        "pipeline_per_s": 1 / pipe, "pure_per_s": 1 / pure, "pipeline_over_pure": pure / pipe,
        "gflop": flops / 1e9, "unet_gflop": unet_flops / 1e9, "unet_calls_per_batch": unet_calls,
        "achieved_tflops": flops / pure / 1e12, "peak_tflops": peak / 1e12, "mfu": flops / pure / peak,
        "unet_mfu": (unet_flops / unet / peak) if unet > 0 else None,
        "unet_time_share": unet / pure, "peak_mem_gib": peak_memory(device),
        "peak_mem": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss_incl_weights",
        **extra,
    }


def run_one(args) -> None:
    import torch

    from diqa_cli.backbone import resolve_device, resolve_dtype
    from diqa_cli.methods import get_method

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec = get_method(args.one)
    work = Path(args.work)
    measure = measure_video if spec.input_kind == "video" else measure_image
    result = measure(spec, args, work, device, dtype)
    result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: inputs, one process per method, ratios -------------------------------------------


def prepare(work: Path, specs, quick: bool, max_batch: int) -> None:
    """Write what the methods need into ``work`` (kept between runs with ``--work``)."""
    from diqa_cli.tiny import write_tiny_bundle

    if not (work / "tiny").exists():
        progress("writing the tiny bundle")
        write_tiny_bundle(work / "tiny")
    if not (work / "photos").exists():
        write_images(work / "photos", max(max_batch, 8), long_side=768)
    tokenizer = work / "tiny" / "backbone" / "tokenizer"
    if not quick:
        needed = {spec.default_backbone for spec in specs if spec.extra.get("needs_backbone", True)}
        for name in sorted(needed):
            if not (work / name).exists():
                progress(f"writing a {name}-sized random backbone")
                write_random_sd(name, work / name, tokenizer)
        if not (work / "clip").exists():
            write_random_clip(work / "clip", 768, tokenizer)
    if any(spec.input_kind == "video" for spec in specs) and not (work / "clip.mp4").exists():
        from bench_video import synthetic_clip

        size = (320, 180) if quick else (960, 540)
        synthetic_clip(work / "clip.mp4", 2.0 if quick else 4.0, 25, *size)


# --- diqa against the released code -----------------------------------------------------------------

PARITY = HERE.parent / "tools" / "parity"
# Per method: which clone runs it, the released test batch size (DP-IQA's build.py: 16 for the
# teacher, half of the student's 24 in train_student.py's test loader; GenzIQA's test loader 16,
# scored one image at a time), and on this CPU the images timed per round and the untimed warm-up
# files (none where one image takes a minute or more: a first pass's setup is small beside it).
RELEASED = {
    "dpiqa": {"clone": "dpiqa", "test_batch": 16, "images": 2, "warmup": 0},
    "dpiqa-student": {"clone": "dpiqa", "test_batch": 12, "images": 4, "warmup": 1},
    "genziqa": {"clone": "genziqa", "test_batch": 16, "images": 1, "warmup": 0},
}


def _timing(command: list[str], env: dict, log: Path) -> dict | None:
    """One side's ``time`` run; its ``TIME`` JSON, or None (output kept in ``log``)."""
    with open(log, "a") as handle:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=handle, text=True, check=False)
        handle.write(done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TIME ")]
    return json.loads(lines[-1][len("TIME "):]) if done.returncode == 0 and lines else None


def measure_released(method: str, clone: str, args, work: Path, threads: int) -> dict:
    """diqa's pipeline and the released loop on the same weights and files, alternated over
    ``--released-rounds`` rounds, each side a fresh process per round."""
    sys.path.insert(0, str(PARITY))
    import run as parity

    from bench import cpu_pressure

    setting = RELEASED[method]
    parity_work = parity.Work(Path(args.parity_work) if args.parity_work else work / "parity")
    clones = {setting["clone"]: Path(clone)}
    diqa, diqa_env, released, released_env = parity.sides(parity_work, threads, args.released_python, **{
        "dpiqa": clones.get("dpiqa"), "genziqa": clones.get("genziqa")})
    progress(f"{method} vs released: weights in {parity_work.root} (built once: about 15 GB for all three)")
    with contextlib.redirect_stdout(sys.stderr):  # the parity steps' progress lines are not report lines
        parity.prepare_and_weights(parity_work, [method], ["512"], 2, (diqa, diqa_env), (released, released_env))
    images = args.released_images or setting["images"]
    batch = min(setting["test_batch"], images)
    files = sorted(str(p) for p in (work / "photos").glob("*.jpg"))[: setting["warmup"] + images]
    timing = ["time", "--method", method, "--work", str(parity_work.root), "--batch-size", str(batch),
              "--warmup", str(setting["warmup"]), "--files", *files]
    logs = parity_work.root / "logs"
    runs = {"diqa": [], "released": []}
    loads = []
    for rep in range(args.released_rounds):
        for side, command, env in (("diqa", diqa, diqa_env), ("released", released, released_env)):
            progress(f"{method} vs released: round {rep + 1}/{args.released_rounds}: {side}, {images} image(s), batch {batch}")
            loads.append(os.getloadavg()[0])
            got = _timing(command + timing, env, logs / f"time-{side}-{method}.log")
            if got is None:
                return {"method": method, "status": f"failed({side}_side:see_{logs / f'time-{side}-{method}.log'})"}
            runs[side].append(got)
    flops = {}
    if args.released_flops:
        for side, command, env in (("diqa", diqa, diqa_env), ("released", released, released_env)):
            progress(f"{method} vs released: FLOPs of {side}'s loop (a counted pass, not timed)")
            got = _timing(command + timing + ["--count-flops"], env, logs / f"flops-{side}-{method}.log")
            flops[f"{side}_gflop_per_image"] = got["gflop_per_image"] if got else "failed"
    diqa_s = statistics.median(r["seconds_per_image"] for r in runs["diqa"])
    released_s = statistics.median(r["seconds_per_image"] for r in runs["released"])
    score_diff = max(abs(a - b) for d, r in zip(runs["diqa"], runs["released"]) for a, b in zip(d["scores"], r["scores"]))
    forward = {f"{side}_forward_s_per_image": statistics.median(r["forward_s_per_image"] for r in runs[side])
               for side in runs}
    return {
        "method": method, "status": "ok", "rounds": args.released_rounds, "images_per_round": images, "batch": batch,
        "warmup_files": setting["warmup"], "threads": threads,
        "threads_seen": f"{runs['diqa'][0]['threads']}/{runs['released'][0]['threads']}",
        "diqa_s_per_image": diqa_s, "released_s_per_image": released_s, "diqa_over_released": released_s / diqa_s,
        "diqa_rounds_s": "/".join(f"{r['seconds_per_image']:.2f}" for r in runs["diqa"]),
        "released_rounds_s": "/".join(f"{r['seconds_per_image']:.2f}" for r in runs["released"]),
        "diqa_over_released_forward": forward["released_forward_s_per_image"] / forward["diqa_forward_s_per_image"],
        **forward, **flops, "max_score_diff": score_diff,
        "peak_rss_gib_diqa": max(r["peak_rss_gib"] for r in runs["diqa"]),
        "peak_rss_gib_released": max(r["peak_rss_gib"] for r in runs["released"]),
        "loadavg_1min": "/".join(f"{v:.2f}" for v in loads), "cpu_pressure_60s": cpu_pressure(),
    }


def released_comparison(released: dict, args, work: Path) -> dict:
    """Per method given with ``--released``: the measured comparison, or why it was not run."""
    out = {}
    for method, clone in released.items():
        if method not in RELEASED:
            out[method] = {"method": method, "status": f"skipped(no_released_code:{'/'.join(RELEASED)})"}
        elif args.quick:
            out[method] = {"method": method, "status": "skipped(--quick:the_released_code_runs_at_real_size_only)"}
        elif not args.released_python:
            out[method] = {"method": method, "status": "skipped(no_--released-python)"}
        elif args.device not in ("auto", "cpu"):
            out[method] = {"method": method, "status": "skipped(cpu_only:the_parity_weights_run_on_the_cpu)"}
        else:
            import torch

            out[method] = measure_released(method, clone, args, work, torch.get_num_threads())
        report(bench="real_released", size=f"real_{RESOLUTION}px", weights="random(parity_tool_seeded)",
               **{k: v for k, v in out[method].items()})
    return out


def parse_released(values) -> dict[str, str]:
    released = {}
    for value in values or []:
        method, sep, clone = value.partition("=")
        if not sep or not clone:
            raise SystemExit(f"--released {value!r}: expected METHOD=CLONE_FOLDER, e.g. dpiqa=../DP-IQA")
        released[method] = clone
    return released


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--methods", help="comma-separated method names, all, or none (only the --released "
                        "comparison) (default: all on CUDA and with "
                        "--quick; on the CPU dpiqa,dpiqa-student, since one GenzIQA, LGDM or GenzVQA input takes "
                        "minutes there)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: CUDA 8; CPU 1, 4 for a fast model)")
    parser.add_argument("--max-batch", type=int, default=8, help="images written and decoded for pure compute")
    parser.add_argument("--batches", type=int, help="batches per pipeline round (default CUDA 4, CPU 1)")
    parser.add_argument("--repeats", type=int, help="alternated rounds (default: 1-3, what --budget-s allows)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="rough seconds of rounds per method")
    parser.add_argument("--video-frames", type=int, help="frames per video (default: the method's on CUDA, 1 on CPU)")
    parser.add_argument("--work", help="folder for the written networks and inputs, kept (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64 px: a dry run, numbers meaningless")
    parser.add_argument("--released", action="append", metavar="METHOD=CLONE",
                        help="a local clone of a method's released code (dpiqa, dpiqa-student: RomGai/DP-IQA; "
                        "genziqa: sh-r/GenzIVQA) for the diqa/released ratio; repeatable")
    parser.add_argument("--released-python", help="python of the released code's environment "
                        "(tools/parity/requirements-released.txt)")
    parser.add_argument("--parity-work", help="the parity tool's work folder, whose weights both sides run "
                        "(built there once where missing, about 15 GB; default: WORK/parity)")
    parser.add_argument("--released-rounds", type=int, default=2, help="alternated rounds of each side")
    parser.add_argument("--released-images", type=int, help="images timed per round (default: dpiqa 2, "
                        "dpiqa-student 4, genziqa 1)")
    parser.add_argument("--released-flops", action="store_true", help="also count each side's FLOPs per image "
                        "(one more, untimed pass of each side)")
    parser.add_argument("--json", help="also write the per-method results as JSON lines to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return 0

    from diqa_cli.methods import get_method, list_methods

    methods = args.methods
    if methods is None:
        from diqa_cli.backbone import resolve_device

        methods = "all" if args.quick or resolve_device(args.device).type == "cuda" else f"{TEACHER},{STUDENT}"
    if methods in ("all", "none"):
        specs = list_methods() if methods == "all" else []
    else:
        specs = [get_method(m) for m in methods.split(",")]
    released = parse_released(args.released)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diqa-real-")))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DIQA_HOME", str(work / "home"))
        prepare(work, specs, args.quick, args.max_batch)
        results, failed = {}, []
        for spec in specs:
            progress(f"{spec.name}: measuring in its own process")
            command = [sys.executable, __file__, "--one", spec.name, "--work", str(work), "--device", args.device,
                       "--dtype", args.dtype, "--budget-s", str(args.budget_s), "--max-batch", str(args.max_batch)]
            for name in ("batch_size", "batches", "repeats", "video_frames"):
                if getattr(args, name) is not None:
                    command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                failed.append(spec.name)
                report(method=spec.name, status=f"failed(rc={done.returncode})")
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            results[spec.name] = result
            report(bench="real", size="tiny_64px(--quick)" if args.quick else f"real_{result['resolution']}px",
                   **{k: v for k, v in result.items() if v is not None},
                   images=SYNTHETIC if result["unit"] == "image" else "synthetic_clip(skimage.data)")
        compared = released_comparison(released, args, work)
        failed += [f"released:{m}" for m, r in compared.items() if r["status"].startswith("failed")]
        summary = summarise(results, compared)
        report(bench="real_summary", **summary)
        if args.json:
            Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results.values()))
    return 1 if failed else 0


def summarise(results: dict, compared: dict) -> dict:
    """The ratios, ``key=value``: pipeline over pure compute and MFU per method, student over
    teacher, diqa over the released loop (with each side's seconds per image)."""
    out = {}
    for name, r in results.items():
        out[f"pipeline_over_pure.{name}"] = f"{r['pipeline_over_pure']:.2f}"
        out[f"mfu.{name}"] = f"{r['mfu']:.2f}"
        if r.get("unet_mfu") is not None:
            out[f"unet_mfu.{name}"] = f"{r['unet_mfu']:.2f}"
    if STUDENT in results and TEACHER in results:
        s, t = results[STUDENT], results[TEACHER]
        out["student_over_teacher"] = f"{s['pipeline_per_s'] / t['pipeline_per_s']:.1f}"
        out["student_over_teacher_pure"] = f"{s['pure_per_s'] / t['pure_per_s']:.1f}"
    for name, r in compared.items():
        if r["status"] != "ok":
            out[f"diqa_over_released.{name}"] = r["status"]
            continue
        out[f"diqa_over_released.{name}"] = f"{r['diqa_over_released']:.2f}"
        out[f"diqa_s_per_image.{name}"] = f"{r['diqa_s_per_image']:.3g}"
        out[f"released_s_per_image.{name}"] = f"{r['released_s_per_image']:.3g}"
        out[f"diqa_over_released_forward.{name}"] = f"{r['diqa_over_released_forward']:.2f}"
    if not compared:
        out["diqa_over_released"] = "skipped(no_released_clone_given)"
    return out


if __name__ == "__main__":
    sys.exit(main())
