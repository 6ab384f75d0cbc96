"""The released side of the parity run: imports the released DP-IQA / GenzIQA code from a local
clone and dumps each stage's tensors. Runs in the released code's own environment
(requirements-released.txt), never in diqa's.

    released_side.py weights --part common|dpiqa|dpiqa-student|genziqa --work W --dpiqa CLONE --genziqa CLONE
    released_side.py dump --method dpiqa|dpiqa-student|genziqa --dtype float32|float64 --work W ...
    released_side.py time --method dpiqa|dpiqa-student|genziqa --work W --files F ... --batch-size B ...

``time`` runs the released test-time loop (its dataset transform on image files, its DataLoader
at the batch size given, its model's forward; GenzIQA: VAE encoding and ``compute_score_genziqa``
with the prompt learner as ``text_model``, as genziqa_test.py calls it) and prints one ``TIME``
line of JSON: seconds per image over the timed files (model loading and ``--warmup`` files not
counted), the part of them spent in the model's forward, the scores; ``--count-flops`` adds the
FLOPs per image. ``bench/bench_real.py --released`` runs it against diqa's pipeline.

The process runs in ``W/weights/hub``, where ``runwayml/stable-diffusion-v1-5``,
``openai/clip-vit-large-patch14`` and ``stabilityai/stable-diffusion-2-1-base`` are links to the
random-weight folders: the hub ids hard-coded in the released code resolve to them as local
folders, with no patching. What is patched at run time is listed in README.md ("Runtime patches").
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import resource
import shutil
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GENZIQA_TIMESTEP_COUNT,
    SEED,
    Hooks,
    StageDump,
    Work,
    environment,
    git_commit,
    torch_dtype,
)
from upcast import report_dtype, upcast_on_the_fly  # noqa: E402

import torch  # noqa: E402

HUB_LINKS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "openai/clip-vit-large-patch14": "clip-vit-large-patch14",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
}
# openai/clip-vit-large-patch14's config (the released DP-IQA prompt features come from it).
CLIP_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
CLIP_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
STUDENT_CACHE_FILE = "efficientnet_b7_lukemelas-c5b4e57e.pth"  # torchvision's ImageNet file name
GENZIQA_STEP_DIR = "genziqa-checkpoint-1"


def _hub(work: Work) -> Path:
    hub = work.weights / "hub"
    for repo, target in HUB_LINKS.items():
        link = hub / repo
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(work.weights / target, target_is_directory=True)
    return hub


def _released_import_path(clone: Path, *, embedded_diffusers: bool = False) -> None:
    if embedded_diffusers:
        # GenzIQA's modified diffusers 0.17 (its README installs it with `pip install -e`).
        sys.path.insert(0, str(clone / "diffusers" / "src"))
    sys.path.insert(1 if embedded_diffusers else 0, str(clone))


def _posterior_mean() -> None:
    """Runtime patch: the VAE posterior's sample() returns its mean (diqa's documented departure:
    the released code samples, so no two runs agree)."""
    from diffusers.models.vae import DiagonalGaussianDistribution

    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean


# --- weights ---------------------------------------------------------------------------------------


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    """CLIP ViT-L/14's BPE tokenizer (shared by SD 1.5 and 2.1, which differ in the padding token),
    built from the vocabulary file the ``openai-clip`` package ships (no hub access here)."""
    import clip
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(Path(clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(str(folder))


def _sd_folder(folder: Path, configs: Path, seed: int, *, text_encoder: bool, pad_token: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(configs / "model_index.json", folder / "model_index.json")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(configs / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    _write_tokenizer(folder / "tokenizer", pad_token)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    del unet
    gc.collect()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    del vae
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed + 2)
        config = CLIPTextConfig.from_json_file(str(configs / "text_encoder" / "config.json"))
        CLIPTextModel(config).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    gc.collect()


def _clip_folder(folder: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    _write_tokenizer(folder, "<|endoftext|>")
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=768)
    CLIPModel(config).save_pretrained(str(folder), safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=CLIPTokenizer.from_pretrained(str(folder)))
    processor.save_pretrained(str(folder))


def weights_common(args, work: Work) -> None:
    configs = Path(args.diqa_configs)
    _sd_folder(work.sd15(), configs / "sd15", SEED, text_encoder=False, pad_token="<|endoftext|>")
    _sd_folder(work.sd21(), configs / "sd21-base", SEED + 100, text_encoder=True, pad_token="!")
    _clip_folder(work.clip(), SEED + 200)


def weights_dpiqa(args, work: Work) -> None:
    """A released-format teacher state dict (``torch.save(DPIQA.state_dict())``): the released
    class built on the random SD 1.5, gamma drawn (its 1e-4 init would hide the text adapter) and
    the U-Net perturbed, as fine-tuning would leave it (so diqa must take it from the head)."""
    _released_import_path(Path(args.dpiqa))
    from iqa_models.dpiqa import DPIQA

    placeholder = work.weights / "placeholder_embeddings.pth"
    torch.save(torch.zeros(1485, 768), placeholder)  # only its width is read at construction
    torch.manual_seed(SEED + 300)
    model = DPIQA(class_embedding_path=str(placeholder))
    generator = torch.Generator().manual_seed(SEED + 301)
    with torch.no_grad():
        model.gamma.copy_(0.1 * torch.randn(model.gamma.shape, generator=generator))
        for param in model.unet.parameters():
            param.mul_(1 + 0.01 * torch.randn(param.shape, generator=generator))
    work.heads.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), work.heads / "dpiqa_released.pth")
    placeholder.unlink()


def _released_transform_dpiqa():
    import datasets_in_the_wild

    return datasets_in_the_wild.transform_in_the_wild


def weights_student(args, work: Work) -> None:
    """A released-format student state dict. Its EfficientNet-B7 starts from random weights placed
    in torch's hub cache under the ImageNet file's name (``pretrained=True`` then loads them, no
    download); BatchNorm statistics come from one train-mode pass over the parity images, else a
    random EfficientNet in eval mode shrinks every signal to zero."""
    import torchvision
    from PIL import Image

    _released_import_path(Path(args.dpiqa))
    from iqa_models.student import StudentEfficientNet

    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED + 400)
    torch.save(torchvision.models.efficientnet_b7(weights=None).state_dict(), cache / STUDENT_CACHE_FILE)
    torch.manual_seed(SEED + 401)
    model = StudentEfficientNet()
    transform = _released_transform_dpiqa()
    pixels = torch.stack([transform(Image.open(work.images / i["file"]).convert("RGB")) for i in work.image_list()])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    model.train()
    with torch.no_grad():
        model(pixels)
    for module in norms:
        module.momentum = 0.1
    work.heads.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), work.heads / "student_released.pth")


def _genziqa_dirs(work: Work) -> tuple[Path, Path]:
    root = work.heads / "genziqa"
    return root / "coop_states" / GENZIQA_STEP_DIR, root / "unet_states" / GENZIQA_STEP_DIR


def _lora_processors(unet, rank: int = 4) -> dict:
    """The LoRA processors as the released genziqa_train.py / genziqa_test.py attach them."""
    from diffusers.models.cross_attention import LoRACrossAttnProcessor

    processors = {}
    for name in unet.attn_processors.keys():
        cross_attention_dim = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden_size = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden_size = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden_size = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        processors[name] = LoRACrossAttnProcessor(hidden_size=hidden_size, cross_attention_dim=cross_attention_dim, rank=rank)
    return processors


def weights_genziqa(args, work: Work) -> None:
    """The two released GenzIQA files of one training step: the prompt learner
    (``coop_Model_state_dict.pth``) and the LoRA processors (``save_attn_procs``, renamed
    ``pytorch_model.bin`` by the released diffusers). Context vectors keep the released init
    N(0, 0.02); LoRA ``down`` keeps its init, cross-attention ``up`` is drawn (the init's zeros
    would make LoRA a no-op); self-attention ``up`` stays zero, as the released training freezes it."""
    _released_import_path(Path(args.genziqa), embedded_diffusers=True)
    from antonym_prompt_learner import CustomCLIP
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    coop_dir, unet_dir = _genziqa_dirs(work)
    coop_dir.mkdir(parents=True, exist_ok=True)
    base = str(work.sd21())
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    torch.manual_seed(SEED + 500)
    coop = CustomCLIP(tokenizer, text_encoder, ["Good Photo", "Bad Photo"], "end")
    torch.save(coop.prompt_learner.state_dict(), coop_dir / "coop_Model_state_dict.pth")
    del coop, text_encoder
    gc.collect()

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(SEED + 501)
    processors = _lora_processors(unet)
    generator = torch.Generator().manual_seed(SEED + 502)
    with torch.no_grad():
        for name, processor in processors.items():
            if name.endswith("attn2.processor"):
                for layer in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
                    layer.up.weight.copy_(0.01 * torch.randn(layer.up.weight.shape, generator=generator))
    unet.set_attn_processor(processors)
    unet.save_attn_procs(str(unet_dir))


# --- dumps -----------------------------------------------------------------------------------------


def _images(work: Work):
    from PIL import Image

    for info in work.image_list():
        # The released loaders' pil_loader: open, convert("RGB").
        yield info["id"], Image.open(work.images / info["file"]).convert("RGB")


def _dump_dpiqa_scores(model, work: Work, dtype, dump: StageDump, hooks: Hooks, label: str) -> None:
    """Run the released DP-IQA teacher or student over the parity images through the released
    transform, with ``hooks`` on: its input, feature map and score go into ``dump`` too."""
    transform = _released_transform_dpiqa()
    with torch.no_grad():
        for image_id, image in _images(work):
            hooks.image = image_id
            pixels = transform(image).unsqueeze(0).to(dtype)
            dump.put(image_id, "input", pixels[0])
            score, feature_map = model(pixels)
            dump.put(image_id, "feature_map", feature_map[0])
            dump.put(image_id, "score", score.reshape(-1))
            print(f"released {label} {image_id}: score {score.item():.6f}", flush=True)
    hooks.close()


def _gene_text_embedding(args, work: Work, dtype) -> Path:
    """Run the released gene_text_embedding.py as it is (its CLIPProcessor / CLIPModel load
    ``openai/clip-vit-large-patch14``, the local link); it writes quality_embeddings_3.pth into
    the working directory. float64: torch's default dtype is float64 while it runs, so its CLIP
    is built in float64."""
    import runpy

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        runpy.run_path(str(Path(args.dpiqa) / "gene_text_embedding.py"), run_name="__main__")
    finally:
        torch.set_default_dtype(previous)
    out = work.root / f"released-quality_embeddings-{str(dtype).split('.')[-1]}.pth"
    shutil.move("quality_embeddings_3.pth", out)
    gc.collect()
    return out


def _dpiqa_model(work: Work, embeddings: Path):
    """The released teacher with the released-format state dict loaded, in eval mode."""
    from iqa_models.dpiqa import DPIQA

    model = DPIQA(class_embedding_path=str(embeddings))
    state = torch.load(work.heads / "dpiqa_released.pth", mmap=True)
    model.load_state_dict(state, strict=True)
    del state
    return model.eval()


def dump_dpiqa(args, work: Work, dtype, dump: StageDump) -> None:
    _released_import_path(Path(args.dpiqa))
    _posterior_mean()
    embeddings = _gene_text_embedding(args, work, dtype)
    features = torch.load(embeddings)
    for info in work.image_list():
        dump.put(info["id"], "prompt_features", features)
    model = _dpiqa_model(work, embeddings)
    if dtype == torch.float64:
        for module in (model.vae, model.img_adapter, model.text_adapter, model.QFD):
            module.double()
        model.gamma.data = model.gamma.data.double()
        upcast_on_the_fly(model.unet)
        report_dtype(model.unet)
    hooks = Hooks(dump)
    hooks.handles.append(
        model.unet.register_forward_pre_hook(lambda m, a: dump.put(hooks.image, "latents", a[0][0]))
    )
    hooks.output(model.text_adapter, "context")
    hooks.output(model.img_adapter, "adapter", lambda out: [r[0] for r in out])
    hooks.output(model.unet, "up", lambda out: [u[0] for u in out])
    _dump_dpiqa_scores(model, work, dtype, dump, hooks, "dpiqa")


def _student_model(work: Work):
    from iqa_models.student import StudentEfficientNet

    model = StudentEfficientNet()
    model.load_state_dict(torch.load(work.heads / "student_released.pth"), strict=True)
    return model.eval()


def dump_student(args, work: Work, dtype, dump: StageDump) -> None:
    _released_import_path(Path(args.dpiqa))
    model = _student_model(work).to(dtype)
    hooks = Hooks(dump)
    for index, block in enumerate(model.base_model.features):
        hooks.output(block, f"features.{index}")
    hooks.output(model.conv_transpose, "conv_transpose")
    _dump_dpiqa_scores(model, work, dtype, dump, hooks, "dpiqa-student")


class _TransformOnly:
    """Stands in for clive.CLIVEdataset (which reads the CLIVE .mat files) so that
    clive.DataLoader can be built for its transform alone."""

    def __init__(self, root_dir, index, transform=None):
        self.tranform = transform  # the released attribute name


def _released_transform_genziqa():
    """The released CLIVE test transform, taken from clive.DataLoader; its random flips are
    switched off (p = 0), diqa's documented departure (no test-time flips)."""
    import clive
    from torchvision import transforms

    clive.CLIVEdataset = _TransformOnly
    transform = clive.DataLoader(1, "CLIVE", "unused", 1).data.tranform
    for step in transform.transforms:
        if isinstance(step, (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip)):
            step.p = 0.0
    return transform


def _as_under_torch1() -> None:
    """Runtime patch: the embedded diffusers 0.17 sees ``torch.nn.functional`` without
    ``scaled_dot_product_attention``, as under the torch 1.13 the released code pins. It picks its
    attention processors by that attribute (``AttnProcessor2_0`` / ``LoRAAttnProcessor2_0`` under
    torch 2), and the released code modified only the torch-1 ones to also return the scores its
    U-Net and VAE blocks unpack; under torch 2 it fails (or would read no scores)."""
    import importlib

    import torch.nn.functional as functional

    without_sdpa = types.ModuleType("torch.nn.functional (as torch 1.13)")

    def lookup(name):
        if name == "scaled_dot_product_attention":
            raise AttributeError(name)
        return getattr(functional, name)

    without_sdpa.__getattr__ = lookup
    for name in ("diffusers.loaders", "diffusers.models.attention_processor", "diffusers.models.unet_2d_blocks"):
        importlib.import_module(name).F = without_sdpa


def _genziqa_imports(args):
    """The released GenzIQA code on ``sys.path`` (its embedded diffusers first), the runtime
    patches applied; returns ``compute_score_genziqa``."""
    _released_import_path(Path(args.genziqa), embedded_diffusers=True)
    import diffusers

    # utils/losses.py imports the `datasets` package at the top; compute_score_genziqa never uses
    # it. A stand-in only while importing it (transformers, already imported, probed for the real one).
    sys.modules["datasets"] = types.ModuleType("datasets")
    try:
        from utils.losses import compute_score_genziqa
    finally:
        del sys.modules["datasets"]

    if "GenzIVQA" not in diffusers.__file__ and str(Path(args.genziqa)) not in diffusers.__file__:
        raise RuntimeError(f"imported diffusers from {diffusers.__file__}, not the clone's embedded copy")
    _as_under_torch1()
    _posterior_mean()
    return compute_score_genziqa


def _genziqa_prompt_learner(work: Work, dtype):
    """CustomCLIP as genziqa_test.py builds it, the learner's saved state loaded; and its tokenizer."""
    from antonym_prompt_learner import CustomCLIP
    from transformers import CLIPTextModel, CLIPTokenizer

    base = str(work.sd21())
    coop_dir, _ = _genziqa_dirs(work)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    coop = CustomCLIP(tokenizer, text_encoder, ["Good Photo", "Bad Photo"], "end")
    coop.prompt_learner.load_state_dict(torch.load(coop_dir / "coop_Model_state_dict.pth"))
    return coop.eval().to(dtype), tokenizer


def _genziqa_pipeline(work: Work, dtype, tokenizer):
    """(vae, unet, DSDPipeline) with the saved LoRA processors loaded."""
    from diffusers import AutoencoderKL, DSDPipeline, EulerDiscreteScheduler, UNet2DConditionModel

    base = str(work.sd21())
    _, unet_dir = _genziqa_dirs(work)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval().to(dtype)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.set_attn_processor(_lora_processors(unet))
    unet.load_attn_procs(str(unet_dir))
    unet.eval()
    if dtype == torch.float64:
        from diffusers.models.attention_processor import LoRALinearLayer

        upcast_on_the_fly(unet, atomic=(LoRALinearLayer,))
        report_dtype(unet)
    scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    # genziqa_test.py: DSDPipeline.from_pretrained(base, scheduler=…, unet=…); built from the same
    # parts here, without the text encoder, which the pipeline never calls when given prompt
    # embeddings (the prompt learner holds its own).
    pipeline = DSDPipeline(
        vae=vae, text_encoder=None, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    bank_shape = tuple(pipeline.noise_samples.shape)
    if bank_shape[0] < GENZIQA_TIMESTEP_COUNT:
        raise RuntimeError(f"noise bank {bank_shape} from ~/diffusers/noise_samples.pkl is not the parity bank")
    return vae, unet, pipeline


# genziqa_test.py's arguments (run_genziqa_test.sh): val_batch_size 1, 8 sampling steps, guidance 0,
# --bias not given (store_false: the bias term is on).
GENZIQA_RUN_ARGS = types.SimpleNamespace(val_batch_size=1, guidance_scale=0.0, sampling_time_steps=GENZIQA_TIMESTEP_COUNT, bias=True)


def dump_genziqa(args, work: Work, dtype, dump: StageDump) -> None:
    compute_score_genziqa = _genziqa_imports(args)
    images = list(_images(work))
    coop, tokenizer = _genziqa_prompt_learner(work, dtype)
    with torch.no_grad():
        prompt_embeds = coop()
    for image_id, _ in images:
        dump.put(image_id, "prompt_embeddings", prompt_embeds)
    del coop
    gc.collect()

    transform = _released_transform_genziqa()
    vae, unet, pipeline = _genziqa_pipeline(work, dtype, tokenizer)

    state = {"image": None, "step": 0}

    def before(module, args):
        dump.put(state["image"], f"t{state['step']}.unet_input", args[0])

    def after(module, args, out):
        noise_uncond, noise_cond, dbscore, _ = out
        shape = args[0].shape[1:]
        dump.put(state["image"], f"t{state['step']}.noise_pred", torch.cat([noise_uncond, noise_cond]).view(2, *shape))
        dump.put(state["image"], f"t{state['step']}.layer_scores", dbscore)
        state["step"] += 1

    handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
    handles.append(vae.encoder.register_forward_pre_hook(lambda m, a: dump.put(state["image"], "input", a[0][0])))
    with torch.no_grad():
        for image_id, image in images:
            state.update(image=image_id, step=0)
            pixels = transform(image).unsqueeze(0).to(dtype)
            # genziqa_test.py: latent_dist.sample() * scaling_factor (sample() patched to the mean).
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            dump.put(image_id, "latents", latents[0])
            scores = compute_score_genziqa(0, GENZIQA_RUN_ARGS, latents, pipeline, text_model=None, fixed_prompt_embeds=prompt_embeds)
            dump.put(image_id, "timesteps", torch.tensor([float(t) for t in pipeline.timesteps], dtype=torch.float64))
            dump.put(image_id, "score", scores.reshape(-1))
            print(f"released genziqa {image_id}: score {scores.item():.6f}", flush=True)
    for handle in handles:
        handle.remove()


# --- timing ----------------------------------------------------------------------------------------


class _Files(torch.utils.data.Dataset):
    """The released datasets' ``__getitem__`` on a plain list of files: the file opened and
    converted to RGB by PIL, the released test transform, a placeholder MOS (the released
    datasets read theirs from their .csv / .mat files)."""

    def __init__(self, files: list[str], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image

        with open(self.files[index], "rb") as handle:
            image = Image.open(handle).convert("RGB")
        return self.transform(image), torch.tensor(0.0), self.files[index]


def _timed(loader_of, files: list[str], args, forward, after=lambda: None) -> dict:
    """Runs the loop over a DataLoader of the warm-up files (not timed), then of the timed ones:
    ``forward`` on each batch (its scores), then ``after``. Returns the timed loop's seconds,
    the seconds inside ``forward`` and the scores; with ``--count-flops`` also the FLOPs of the
    timed loop, counted by torch's FlopCounterMode (which slows it: not a timing run)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    for images, _, _ in loader_of(files[: args.warmup]) if args.warmup else ():
        forward(images)
        after()
    scores, inside = [], 0.0
    counter = FlopCounterMode(display=False) if args.count_flops else contextlib.nullcontext()
    started = time.perf_counter()
    with counter:
        for images, _, _ in loader_of(files[args.warmup :]):
            begun = time.perf_counter()
            out = forward(images)
            inside += time.perf_counter() - begun
            scores += [float(v) for v in out.reshape(-1)]
            after()
    measured = {"seconds": time.perf_counter() - started, "forward_seconds": inside, "scores": scores}
    if args.count_flops:
        measured["flops"] = counter.get_total_flops()
    return measured


def _loader(transform, batch_size: int):
    # The released test loaders: a DataLoader over the dataset, shuffle off, no worker processes.
    return lambda files: torch.utils.data.DataLoader(_Files(files, transform), batch_size=batch_size, shuffle=False)


def time_dpiqa(args, work: Work, files: list[str]) -> dict:
    """train_dpiqa.py's / train_student.py's test loop: each batch to the model under no_grad
    (the score is the first output), ``gc.collect()`` after it."""
    _released_import_path(Path(args.dpiqa))
    if args.method == "dpiqa":
        _posterior_mean()
        # The prompt features: gene_text_embedding.py's output, a file the released model loads.
        cached = work.root / "released-quality_embeddings-float32.pth"
        model = _dpiqa_model(work, cached if cached.is_file() else _gene_text_embedding(args, work, torch.float32))
    else:
        model = _student_model(work)

    def forward(images):
        with torch.no_grad():
            return model(images)[0]

    return _timed(_loader(_released_transform_dpiqa(), args.batch_size), files, args, forward, gc.collect)


def time_genziqa(args, work: Work, files: list[str]) -> dict:
    """genziqa_test.py's test loop: each batch VAE-encoded (posterior mean, see README), then
    ``compute_score_genziqa`` with the prompt learner as ``text_model`` (its prompts re-encoded
    every batch, as there) at val_batch_size 1."""
    compute_score_genziqa = _genziqa_imports(args)
    coop, tokenizer = _genziqa_prompt_learner(work, torch.float32)
    vae, _, pipeline = _genziqa_pipeline(work, torch.float32, tokenizer)
    batches = iter(range(10**9))

    def forward(images):
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            return compute_score_genziqa(next(batches), GENZIQA_RUN_ARGS, latents, pipeline, text_model=coop,
                                         fixed_prompt_embeds=None)

    return _timed(_loader(_released_transform_genziqa(), args.batch_size), files, args, forward)


def time_method(args, work: Work) -> None:
    files = args.files
    if len(files) <= args.warmup:
        raise SystemExit(f"time: {len(files)} file(s) given, {args.warmup} of them warm-up: nothing left to time")
    started = time.perf_counter()
    timer = time_genziqa if args.method == "genziqa" else time_dpiqa
    measured = timer(args, work, files)
    timed = len(files) - args.warmup
    result = {"side": "released", "method": args.method, "images": timed, "batch": args.batch_size,
              "warmup": args.warmup, "seconds_per_image": measured["seconds"] / timed,
              "forward_s_per_image": measured["forward_seconds"] / timed, "scores": measured["scores"],
              "total_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if "flops" in measured:
        result["gflop_per_image"] = measured["flops"] / timed / 1e9
    print("TIME " + json.dumps(result), flush=True)


DUMPERS = {"dpiqa": dump_dpiqa, "dpiqa-student": dump_student, "genziqa": dump_genziqa}
WEIGHTS = {"common": weights_common, "dpiqa": weights_dpiqa, "dpiqa-student": weights_student, "genziqa": weights_genziqa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("weights", "dump", "time"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--dpiqa", help="local clone of RomGai/DP-IQA (DP-IQA teacher and student)")
    parser.add_argument("--genziqa", help="local clone of sh-r/GenzIVQA (GenzIQA)")
    parser.add_argument("--diqa-configs", help="diqa_cli/configs (SD 1.5 and 2.1-base configs), for weights")
    parser.add_argument("--part", choices=tuple(WEIGHTS))
    parser.add_argument("--method", choices=tuple(DUMPERS))
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--limit", type=int, help="dump only the first N images")
    parser.add_argument("--files", nargs="+", help="time: the image files, in order")
    parser.add_argument("--batch-size", type=int, default=1, help="time: the DataLoader's batch size")
    parser.add_argument("--warmup", type=int, default=0, help="time: the first N files run once first, not timed")
    parser.add_argument("--count-flops", action="store_true", help="time: count the timed loop's FLOPs (slower)")
    args = parser.parse_args()
    needed = {"dpiqa": "dpiqa", "dpiqa-student": "dpiqa", "genziqa": "genziqa"}
    for step in (args.part, args.method):
        clone = needed.get(step)
        if clone and not getattr(args, clone):
            parser.error(f"{step} needs --{clone} (the local clone of its released code)")
    work = Work(args.work, args.limit)
    # Before the chdir below: relative paths name files from where the command was given.
    args.files = [str(Path(f).resolve()) for f in args.files or []]
    torch.set_grad_enabled(False)
    os.chdir(_hub(work))
    if args.command == "weights":
        WEIGHTS[args.part](args, work)
        return
    if args.command == "time":
        time_method(args, work)
        return
    dtype = torch_dtype(args.dtype)
    dump = StageDump()
    DUMPERS[args.method](args, work, dtype, dump)
    clone = Path(args.genziqa if args.method == "genziqa" else args.dpiqa)
    import diffusers
    import transformers

    env = environment(
        ("torch", "torchvision", "transformers", "tokenizers", "huggingface_hub", "numpy", "PIL"),
        side="released",
        clone=str(clone),
        commit=git_commit(clone),
        diffusers=f"{diffusers.__version__} ({diffusers.__file__})",
        transformers=transformers.__version__,
    )
    dump.save(work.dump_path("released", args.method, args.dtype), env)


if __name__ == "__main__":
    main()
