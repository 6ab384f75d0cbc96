"""The diqa side of the parity run: the synthetic images and the noise bank, the conversion of
the released-format heads through ``diqa_cli.weights.convert``, and the stage dumps of diqa's
models on the same weights and images. Runs in diqa's environment with the worktree's
``diqa_cli`` on PYTHONPATH.

    diqa_side.py prepare --work W --size 512 300x200 --images 2
    diqa_side.py dump --method dpiqa|dpiqa-student|genziqa --dtype float32|float64 --work W
    diqa_side.py time --method dpiqa|dpiqa-student|genziqa --work W --files F ... --batch-size B

``time`` loads the converted head as ``dump`` does (so both sides of ``bench/bench_real.py
--released`` run the same weights) and times diqa's pipeline from files to rows,
``pipelines.images.score_images``; it prints one ``TIME`` line of JSON, as released_side.py's does.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GENZIQA_SEED,
    GENZIQA_TIMESTEP_COUNT,
    SD_LATENT,
    Hooks,
    StageDump,
    Work,
    environment,
    git_commit,
    torch_dtype,
)
from upcast import report_dtype, upcast_on_the_fly  # noqa: E402

import torch  # noqa: E402

# skimage.data photos, in the order each size takes them.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def prepare(args, work: Work) -> None:
    """8-bit PNGs from skimage.data, resized (bicubic) to each WIDTHxHEIGHT; the GenzIQA noise bank:
    diqa's own (``GenzIQA._noise_bank``: one ``randn`` per timestep from a generator seeded with the
    head's seed, 0), also written where the released pipeline reads its bank, ``~/diffusers/noise_samples.pkl``
    under the released process's HOME (only its first 8 entries are read, one per timestep)."""
    import skimage.data
    from PIL import Image

    work.images.mkdir(parents=True, exist_ok=True)
    listed = []
    # Photo-major order, so the first N images (--limit, the float64 run) span the sizes.
    for k in range(args.images):
        for size in args.size:
            width, height = _size(size)
            name = PHOTOS[k % len(PHOTOS)]
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            file = f"{width}x{height}-{name}.png"
            image.save(work.images / file)
            listed.append({"id": f"{width}x{height}-{name}", "file": file, "size": [width, height], "source": f"skimage.data.{name}"})
    (work.images / "images.json").write_text(json.dumps(listed, indent=1) + "\n")

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(GENZIQA_SEED)
    bank = torch.stack([torch.randn(SD_LATENT, generator=generator) for _ in range(GENZIQA_TIMESTEP_COUNT)])
    save_file({"bank": bank}, str(work.noise_bank))
    (work.released_home / "diffusers").mkdir(parents=True, exist_ok=True)
    with open(work.released_home / "diffusers" / "noise_samples.pkl", "wb") as handle:
        pickle.dump(bank, handle)


# --- heads through diqa's converter -------------------------------------------------------------

def _converted(work: Work, method: str) -> Path:
    from diqa_cli.weights.convert import convert

    out = work.root / "diqa-heads" / f"{method}.safetensors"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if method == "genziqa":
        root = work.heads / "genziqa"
        sources = [
            next((root / "coop_states").glob("*/coop_Model_state_dict.pth")),
            next((root / "unet_states").glob("*/pytorch_model.bin")),
        ]
    else:
        sources = [work.heads / ("dpiqa_released.pth" if method == "dpiqa" else "student_released.pth")]
    convert(sources if len(sources) > 1 else sources[0], out, method=method)
    gc.collect()
    return out


def _load(work: Work, method: str, backbone=None, overrides=None):
    """The head as ``diqa score --checkpoint converted.safetensors`` builds a bare released state
    dict: the method's released sidecar (diqa_cli.checkpoint.released_sidecar)."""
    from diqa_cli.checkpoint import load_head, released_sidecar
    from diqa_cli.methods import get_method

    head = _converted(work, method)
    spec = get_method(method)
    model, _ = load_head(
        head, backbone=backbone, device="cpu", dtype="fp32", offline=True,
        config_overrides=overrides, sidecar=released_sidecar(spec, head.name),
    )
    return model, spec


def _pixels(work: Work, spec, resolution: int):
    """(id, (1, 3, R, R) float32) as ``diqa score`` decodes and resizes each file."""
    from diqa_cli.imageio import InputItem, iter_images

    infos = work.image_list()
    items = [InputItem(str(work.images / info["file"])) for info in infos]
    for info, (item, pixels, error) in zip(infos, iter_images(items, resolution, workers=1, resample=spec.resample, isolation="thread")):
        if error:
            raise RuntimeError(f"{item.path}: {error}")
        yield info["id"], torch.from_numpy(pixels).unsqueeze(0)


def _float64_prompt_features(clip_folder: Path):
    """float64 run only: DP-IQA's prompt features computed the way diqa's backbone._embed does
    (pad to 77, truncate, ``text_embeds``), but kept in float64 (``_embed`` returns float32)."""
    from transformers import CLIPTextModelWithProjection

    from diqa_cli.backbone import _load_tokenizer
    from diqa_cli.models.dpiqa_prompts import quality_prompts

    encoder = CLIPTextModelWithProjection.from_pretrained(str(clip_folder), dtype=torch.float64).eval()
    tokenizer = _load_tokenizer(clip_folder, pad_token=None)
    prompts = quality_prompts()
    outputs = []
    for start in range(0, len(prompts), 64):
        tokens = tokenizer(prompts[start : start + 64], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        outputs.append(encoder(input_ids=tokens.input_ids).text_embeds)
    return torch.cat(outputs)


def _dpiqa_model(work: Work):
    from diqa_cli.backbone import load_backbone

    backbone = load_backbone(str(work.sd15()), device="cpu", dtype="fp32", offline=True)
    # load_scorer frees the backbone's U-Net once a head with its own is built; freed first here
    # (the head's build needs only its structure) so two U-Nets are never in memory.
    backbone.release_unet()
    model, spec = _load(work, "dpiqa", backbone, {"clip": str(work.clip())})
    return backbone, model, spec


def dump_dpiqa(args, work: Work, dtype, dump: StageDump) -> None:
    backbone, model, spec = _dpiqa_model(work)
    if dtype == torch.float64:
        backbone.vae.double()
        backbone.dtype = torch.float64
        for module in (model.img_adapter, model.text_adapter, model.QFD):
            module.double()
        model.gamma.data = model.gamma.data.double()
        model.class_embeddings = _float64_prompt_features(work.clip())
        upcast_on_the_fly(model.unet)
        report_dtype(model.unet)
    hooks = Hooks(dump)
    hooks.handles.append(model.unet.register_forward_pre_hook(lambda m, a: dump.put(hooks.image, "latents", a[0][0])))
    hooks.output(model.text_adapter, "context", lambda out: out)
    hooks.output(model.img_adapter, "adapter", lambda out: [r[0] for r in out])

    def qfd_inputs(module, features):  # QFD takes up.3, up.2, up.1, up.0
        for name, value in zip(("up.3", "up.2", "up.1", "up.0"), features):
            dump.put(hooks.image, name, value[0])

    hooks.handles.append(model.QFD.register_forward_pre_hook(qfd_inputs))
    with torch.no_grad():
        for image_id, pixels in _pixels(work, spec, model.resolution):
            hooks.image = image_id
            pixels = pixels.to(dtype)
            dump.put(image_id, "input", pixels[0])
            dump.put(image_id, "prompt_features", model.class_embeddings)
            scores, feature_map = model.forward_with_map(pixels)
            dump.put(image_id, "feature_map", feature_map[0])
            dump.put(image_id, "score", scores.reshape(-1))
            print(f"diqa dpiqa {image_id}: score {scores.item():.6f}", flush=True)
    hooks.close()


def dump_student(args, work: Work, dtype, dump: StageDump) -> None:
    model, spec = _load(work, "dpiqa-student")
    model.to(dtype)
    hooks = Hooks(dump)
    for index, block in enumerate(model.base_model.features):
        hooks.output(block, f"features.{index}")
    hooks.output(model.conv_transpose, "conv_transpose")
    with torch.no_grad():
        for image_id, pixels in _pixels(work, spec, model.resolution):
            hooks.image = image_id
            pixels = pixels.to(dtype)
            dump.put(image_id, "input", pixels[0])
            scores, feature_map = model.forward_with_map(pixels)
            dump.put(image_id, "feature_map", feature_map[0])
            dump.put(image_id, "score", scores.reshape(-1))
            print(f"diqa dpiqa-student {image_id}: score {scores.item():.6f}", flush=True)
    hooks.close()


def dump_genziqa(args, work: Work, dtype, dump: StageDump) -> None:
    from safetensors.torch import load_file

    from diqa_cli.backbone import load_backbone

    backbone = load_backbone(str(work.sd21()), device="cpu", dtype="fp32", offline=True)
    # float64 runs the U-Net one pair at a time (the released batch): memory, not results.
    overrides = {"unet_batch": 2} if dtype == torch.float64 else None
    model, spec = _load(work, "genziqa", backbone, overrides)
    bank = load_file(str(work.noise_bank))["bank"]
    own = model._noise_bank(GENZIQA_TIMESTEP_COUNT, SD_LATENT).cpu()
    if not torch.equal(own, bank):
        raise RuntimeError("diqa's GenzIQA noise bank is no longer the one prepare wrote for the released side; "
                           "update diqa_side.prepare to draw it as GenzIQA._noise_bank does")
    if dtype == torch.float64:
        from peft.tuners.lora import LoraLayer

        backbone.vae.double()
        backbone.dtype = torch.float64
        _, text_encoder = backbone.text_encoder()
        upcast_on_the_fly(text_encoder)
        report_dtype(text_encoder)
        upcast_on_the_fly(model.unet, atomic=(LoraLayer,))
        report_dtype(model.unet)

    state = {"image": None, "pair": 0}
    handles = [backbone.vae.encoder.register_forward_pre_hook(lambda m, a: dump.put(state["image"], "input", a[0][0]))]
    calls = {}

    def before(module, args, kwargs):
        calls["sample"] = args[0]

    def after(module, args, kwargs, out):
        calls["noise_pred"] = out.sample

    handles.append(model.unet.register_forward_pre_hook(before, with_kwargs=True))
    handles.append(model.unet.register_forward_hook(after, with_kwargs=True))
    pair_scores = model._pair_scores

    def recorded_pair_scores(x0, noise, timesteps, context, queries, maps=False):
        out = pair_scores(x0, noise, timesteps, context, queries, maps)
        for j in range(x0.shape[0]):
            k = state["pair"]
            if k == 0:
                dump.put(state["image"], "latents", x0[j])
            dump.put(state["image"], f"t{k}.unet_input", calls["sample"][2 * j : 2 * j + 2])
            dump.put(state["image"], f"t{k}.noise_pred", calls["noise_pred"][2 * j : 2 * j + 2])
            dump.put(state["image"], f"t{k}.layer_scores", out[0][j])
            state["pair"] += 1
        return out

    model._pair_scores = recorded_pair_scores
    with torch.no_grad():
        context = model._prompt_context()
        for image_id, pixels in _pixels(work, spec, model.resolution):
            state.update(image=image_id, pair=0)
            dump.put(image_id, "prompt_embeddings", context)
            scores = model(pixels.to(dtype))
            dump.put(image_id, "timesteps", torch.tensor(model.config["timesteps"], dtype=torch.float64))
            dump.put(image_id, "score", scores.reshape(-1))
            print(f"diqa genziqa {image_id}: score {scores.item():.6f}", flush=True)
    for handle in handles:
        handle.remove()


def time_method(args, work: Work) -> None:
    """diqa's side of the released-code timing: the pipeline from files to rows on the converted
    head, over the warm-up files first (not timed), then the timed ones."""
    import contextlib
    import resource
    import time

    from torch.utils.flop_counter import FlopCounterMode

    from diqa_cli.backbone import load_backbone
    from diqa_cli.pipelines.images import score_images

    files = [str(Path(f).resolve()) for f in args.files]
    if len(files) <= args.warmup:
        raise SystemExit(f"time: {len(files)} file(s) given, {args.warmup} of them warm-up: nothing left to time")
    started = time.perf_counter()
    if args.method == "dpiqa":
        _, model, _ = _dpiqa_model(work)
    elif args.method == "genziqa":
        model, _ = _load(work, "genziqa", load_backbone(str(work.sd21()), device="cpu", dtype="fp32", offline=True))
    else:
        model, _ = _load(work, "dpiqa-student")

    def rows(paths):
        out = list(score_images(paths, model, batch_size=args.batch_size, workers=2, normalisation={"offset": 0.0, "scale": 1.0}))
        bad = [r for r in out if r["status"] != "ok"]
        if bad:
            raise RuntimeError(f"{bad[0]['path']}: {bad[0]['error']}")
        return out

    if args.warmup:
        rows(files[: args.warmup])
    # The seconds inside the model's forward (hooks on its call), the rest being the pipeline's.
    inside = [0.0, 0.0]
    handles = [model.register_forward_pre_hook(lambda m, a: inside.__setitem__(1, time.perf_counter())),
               model.register_forward_hook(lambda m, a, o: inside.__setitem__(0, inside[0] + time.perf_counter() - inside[1]))]
    counter = FlopCounterMode(display=False) if args.count_flops else contextlib.nullcontext()
    timed_started = time.perf_counter()
    with counter:
        scores = [r["raw_score"] for r in rows(files[args.warmup :])]
    seconds = time.perf_counter() - timed_started
    for handle in handles:
        handle.remove()
    timed = len(files) - args.warmup
    result = {"side": "diqa", "method": args.method, "images": timed, "batch": args.batch_size,
              "warmup": args.warmup, "seconds_per_image": seconds / timed, "forward_s_per_image": inside[0] / timed,
              "scores": scores, "total_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.count_flops:
        result["gflop_per_image"] = counter.get_total_flops() / timed / 1e9
    print("TIME " + json.dumps(result), flush=True)


DUMPERS = {"dpiqa": dump_dpiqa, "dpiqa-student": dump_student, "genziqa": dump_genziqa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("prepare", "dump", "time"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--size", nargs="+", default=["512"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--method", choices=tuple(DUMPERS))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--limit", type=int, help="dump only the first N images")
    parser.add_argument("--files", nargs="+", help="time: the image files, in order")
    parser.add_argument("--batch-size", type=int, default=1, help="time: images per batch")
    parser.add_argument("--warmup", type=int, default=0, help="time: the first N files run once first, not timed")
    parser.add_argument("--count-flops", action="store_true", help="time: count the timed loop's FLOPs (slower)")
    args = parser.parse_args()
    work = Work(args.work, args.limit)
    if args.command == "prepare":
        prepare(args, work)
        return
    if args.command == "time":
        time_method(args, work)
        return
    import diffusers
    import peft
    import transformers

    import diqa_cli

    torch.set_grad_enabled(False)
    dtype = torch_dtype(args.dtype)
    dump = StageDump()
    DUMPERS[args.method](args, work, dtype, dump)
    env = environment(
        ("torch", "torchvision", "diffusers", "transformers", "peft", "numpy", "PIL"),
        side="diqa",
        diqa=f"{diqa_cli.__version__} ({Path(diqa_cli.__file__).parent})",
        commit=git_commit(Path(diqa_cli.__file__).parent),
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
    )
    dump.save(work.dump_path("diqa", args.method, args.dtype), env)


if __name__ == "__main__":
    main()
