"""The diffusion backbone: VAE and U-Net loaded once, frozen, on one device in one dtype.

``load_backbone(ref)`` accepts
  * a weights-manifest name (``sd15``, ``sd21-base``), resolved by :mod:`diqa_cli.weights` into
    the diqa cache (``--offline`` never touches the network);
  * a local diffusers folder (``model_index.json``, or ``unet/`` and ``vae/`` subfolders);
  * a single-file ``.safetensors`` checkpoint in the original Stable Diffusion key layout, whose
    config comes from a shipped ``diqa_cli/configs/<name>/`` folder (``sd15``, ``sd21-base``,
    ``tiny``), chosen with ``config=`` or guessed from the U-Net's widths. SD 2.1 at 768 px
    (v-prediction) has the same widths as 2.1-base and is guessed as 2.1-base: pass ``config=``.
Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused unless ``allow_pickle``;
even then they are read with ``torch.load(weights_only=True)``.

Only the VAE and the U-Net are loaded up front. The text encoder is loaded on demand, and prompt
embeddings are cached under ``DIQA_HOME/embeddings`` keyed by the weights' identity and the
prompts, so a later run with the same prompts never loads it.

Precision policy (``dtype="auto"``): fp16 on CUDA, which is how SD 1.x/2.x weights are released
and run (bf16 has fewer mantissa bits and gains nothing for these VAEs); fp32 on CPU and on MPS.
fp16 on CPU is refused (most CPU kernels lack half implementations); bf16 on CPU is allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diqa_cli import home
from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.files import PICKLE_SUFFIXES, atomic_write, file_sha256, save_safetensors
from diqa_cli.methods import BACKBONE_CORE

# Stage messages for slow steps; the CLI shows them on stderr (``-q`` hides, ``-v`` adds detail).
log = logging.getLogger("diqa")

__all__ = [
    "Backbone",
    "load_backbone",
    "resolve_device",
    "resolve_dtype",
    "clip_text_features",
        "CONFIG_ROOT",
    "SHIPPED_CONFIGS",
]

CONFIG_ROOT = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = ("sd15", "sd21-base", "tiny")
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_TEXT = "cond_stage_model."
# The key whose shape tells the cross-attention width of an original-layout SD U-Net.
_LDM_CROSS_ATTN_KEY = _LDM_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_LDM_CONV_IN_KEY = _LDM_UNET + "input_blocks.0.0.weight"
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What a manifest backbone needs at start, and what only prompt embedding needs.
_TEXT_PARTS = ("text_encoder", "tokenizer")
# The tokenizer files of openai/clip-vit-large-patch14 (its 1.7 GB weights are not needed for them).
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# --- device and dtype ------------------------------------------------------------------------


def resolve_device(name: str = "auto"):
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise UsageError(
                "--device mps: this torch build or machine has no MPS (Apple GPU); use --device cpu or auto"
            )
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"--device {name!r}: the GPU index must be a number, e.g. cuda:0")
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(
                f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}, {build}); "
                "use --device cpu, or auto to take what is there"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise UsageError(
                f"--device {name}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})"
            )
        return torch.device(text)
    raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_dtype(name: str, device) -> Any:
    """``auto``: fp16 on CUDA, fp32 elsewhere. Half precision only where the device runs it."""
    import torch

    device = torch.device(device)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; choose auto, fp32, fp16 or bf16")
    dtype = getattr(torch, _DTYPES[text])
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("--dtype fp16 on the CPU: most CPU kernels have no half version; use fp32 (or bf16)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32"
        )
    return dtype


def dtype_name(dtype) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` for a torch dtype (its own name for any other)."""
    text = str(dtype).replace("torch.", "")
    return next((short for short, long in _DTYPES.items() if long == text), text)


# --- identity: SHA-256 of the weight files, hashed once per (path, size, mtime) ---------------


def _combined_identity(files: dict[str, Path]) -> str:
    """One hash over named files: a single file's identity is its own SHA-256 (the value the
    manifest records); a folder's is the SHA-256 of its ``name sha256`` lines."""
    if len(files) == 1 and "" in files:
        return file_sha256(files[""])
    lines = "".join(f"{name} {file_sha256(p)}\n" for name, p in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- the backbone ------------------------------------------------------------------------------


@dataclass(eq=False)
class Backbone:
    ref: str
    identity: str
    vae: Any
    unet: Any
    scheduler_config: dict
    device: Any
    dtype: Any
    resolution: int
    vae_scale_factor: int
    alphas_cumprod: Any
    source: Path = field(repr=False, default=None)  # the folder or file the weights came from
    manifest_name: str | None = field(repr=False, default=None)  # set when ref was a manifest name
    offline: bool = field(repr=False, default=False)
    config_dir: Path | None = field(repr=False, default=None)  # shipped config of a single file
    allow_pickle: bool = field(repr=False, default=False)
    _text: tuple | None = field(repr=False, default=None)
    _embeddings: dict = field(repr=False, default_factory=dict)

    def release_unet(self) -> None:
        """Free the U-Net's weights when nothing built on this backbone runs it (a head that
        carries its own fine-tuned U-Net, when only scoring). Its structure and config stay (meta
        tensors), so heads can still be built on this backbone; running it is an error."""
        self.unet = self.unet.to("meta")

    # The VAE posterior mean, never a sample: the same image always gives the same latents.
    def encode(self, pixels):
        """Pixels in the VAE's range ([-1, 1] for SD; methods convert first) -> scaled latents."""
        config = self.vae.config
        mean = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean - shift) * config.scaling_factor

    def decode(self, latents):
        """Scaled latents -> pixels in [-1, 1] (not clamped, so gradients stay informative)."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return self.vae.decode(latents.to(self.device, self.dtype) / config.scaling_factor + shift).sample

    def text_encoder(self):
        """(tokenizer, CLIPTextModel): the backbone's own text encoder, frozen, in float32 on the
        backbone's device, loaded on first use and kept on this object (methods that learn prompt
        context need it throughout)."""
        if self._text is None:
            self._text = self._load_text_encoder()
        return self._text

    def prompt_embeddings(self, prompts):
        """(N, 77, D) last hidden states of the text encoder for ``prompts`` (the U-Net's
        cross-attention input), cached on disk; a cache hit never loads the text encoder."""
        prompts = [str(p) for p in prompts]
        key = _cache_key("hidden-states", self.identity, prompts)
        if key not in self._embeddings:
            path = home.subdir("embeddings") / f"{key}.safetensors"
            cached = _read_cached(path)
            if cached is None:
                log.info("embedding %d prompts with %s's text encoder (first use only; cached)", len(prompts), self.ref)
                # Not kept: the encoder lives only long enough to embed the prompts.
                tokenizer, encoder = self._text or self._load_text_encoder()
                cached = _embed(tokenizer, encoder, prompts, self.device, pooled=False)
                _write_cached(path, cached)
            self._embeddings[key] = cached
        return self._embeddings[key].to(self.device, self.dtype)

    def _load_text_encoder(self):
        import torch
        from transformers import CLIPTextModel

        with _quiet_loading():
            if self.source.is_dir():
                folder = self.source
                if self.manifest_name:
                    # A manifest backbone is pulled without its text encoder until it is needed.
                    folder = _locate(self.manifest_name, offline=self.offline, parts=_TEXT_PARTS)
                for sub in ("text_encoder", "tokenizer"):
                    if not (folder / sub).is_dir():
                        raise WeightsError(
                            f"{folder}: no {sub}/ folder; this backbone cannot embed prompts "
                            "(pull the full model, or use a folder with text_encoder/ and tokenizer/)"
                        )
                encoder = _from_pretrained(
                    CLIPTextModel, folder, "text_encoder", torch.float32, self.allow_pickle
                )
                tokenizer = _load_tokenizer(folder / "tokenizer", pad_token=None)
            else:
                encoder, tokenizer = self._load_single_file_text_encoder()
        encoder.to(self.device).eval().requires_grad_(False)
        return tokenizer, encoder

    def _load_single_file_text_encoder(self):
        import torch
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        state = _read_checkpoint(self.source, (_LDM_TEXT,), self.allow_pickle)
        if not state:
            raise WeightsError(
                f"{self.source}: holds no text encoder (no {_LDM_TEXT}* keys); cannot embed prompts"
            )
        encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel,
            state,
            subfolder="text_encoder",
            config=str(self.config_dir),
            torch_dtype=torch.float32,
            local_files_only=True,
        )
        _check_loaded(encoder, self.source, "text encoder")
        tokenizer_dir = self.config_dir / "tokenizer"
        if (tokenizer_dir / "vocab.json").exists():
            return encoder, _load_tokenizer(tokenizer_dir, pad_token=None)
        # SD 1.x and 2.x share CLIP ViT-L/14's BPE vocabulary; only the padding token differs,
        # and the shipped tokenizer_config.json records it.
        pad = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("pad_token")
        clip_folder = _locate("clip-vit-large-patch14", offline=self.offline, parts=_TOKENIZER_FILES)
        return encoder, _load_tokenizer(clip_folder, pad_token=pad)


@dataclass(frozen=True)
class BackboneFiles:
    """What a backbone is, read from its files without loading it: the name it was given, its
    weight identity (what :attr:`Backbone.identity` will be) and native resolution."""

    ref: str
    source: Path
    identity: str
    resolution: int
    config_dir: Path | None  # the config folder a single-file checkpoint is read with


def describe_backbone(ref: str, *, offline: bool = False, config: str | os.PathLike | None = None,
                      allow_pickle: bool = False) -> BackboneFiles:
    """:class:`BackboneFiles` of the backbone ``ref`` names (pulled first if it is a manifest name
    and not ``offline``): the weight files are hashed (once per size and mtime), the U-Net and
    VAE configs read; no weights are loaded."""
    source = _locate(str(ref), offline=home.offline_requested(offline), parts=BACKBONE_CORE)
    if source.is_dir():
        if not _is_diffusers_folder(source):
            raise UsageError(
                f"{source}: not a diffusers folder (expected model_index.json, or unet/ and vae/ subfolders)"
            )
        # The identity covers what features come from (U-Net and VAE), so it does not change when
        # a manifest backbone's text encoder is pulled later.
        files = {f"{sub}/{p.name}": p for sub in ("unet", "vae") for p in _weight_files(source / sub)}
        config_dir, configs = None, source
    else:
        config_dir = _single_file_config(source, config, allow_pickle)
        files, configs = {"": source}, config_dir
    unet_config = _read_json(configs / "unet" / "config.json")
    vae_config = _read_json(configs / "vae" / "config.json")
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return BackboneFiles(
        ref=str(ref),
        source=source,
        identity=_combined_identity(files),
        resolution=int(unet_config["sample_size"]) * scale,
        config_dir=config_dir,
    )


def load_backbone(
    ref: str,
    *,
    device="auto",
    dtype="auto",
    offline: bool = False,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> Backbone:
    """Load the VAE and U-Net named by ``ref`` (see the module docstring), frozen and in eval mode."""
    import torch

    torch_device = resolve_device(device) if not isinstance(device, torch.device) else device
    torch_dtype = resolve_dtype(dtype, torch_device) if not isinstance(dtype, torch.dtype) else dtype
    offline = home.offline_requested(offline)
    described = describe_backbone(str(ref), offline=offline, config=config, allow_pickle=allow_pickle)
    source = described.source
    log.info("loading backbone %s (%s, %s on %s)", ref, _size_on_disk(source), dtype_name(torch_dtype), torch_device)

    with _quiet_loading():
        if source.is_dir():
            unet, vae, scheduler_config = _load_folder(source, torch_dtype, allow_pickle)
        else:
            unet, vae = _load_single_file(source, described.config_dir, torch_dtype, allow_pickle)
            scheduler_config = _read_json(described.config_dir / "scheduler" / "scheduler_config.json")

    for module in (unet, vae):
        module.to(torch_device).eval().requires_grad_(False)
    from diqa_cli.models.xattn import install_shared_context_processors

    # A context shared by the whole batch (an unconditional prompt) is projected once per layer.
    install_shared_context_processors(unet)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return Backbone(
        ref=str(ref),
        identity=described.identity,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config,
        device=torch_device,
        dtype=torch_dtype,
        resolution=int(unet.config.sample_size) * scale,
        vae_scale_factor=scale,
        alphas_cumprod=_alphas_cumprod(scheduler_config).to(torch_device),
        source=source,
        manifest_name=None if Path(str(ref)).expanduser().exists() else str(ref),
        offline=offline,
        config_dir=described.config_dir,
        allow_pickle=allow_pickle,
    )


def _locate(ref: str, *, offline: bool, parts: tuple[str, ...] | None = None) -> Path:
    """A path that exists is used as is; anything that looks like a path but is missing is an
    error; everything else is a weights-manifest name, resolved (and pulled unless offline) for
    just the ``parts`` of its folder that are needed."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if os.sep in ref or "/" in ref or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        raise WeightsError(f"{ref}: no such file or folder")
    from diqa_cli.weights import entry, resolve

    files = [f.path for f in entry(ref).files]
    wanted = None
    if parts is not None and len(files) > 1:
        wanted = [p for p in parts if any(f == p or f.startswith(p + "/") for f in files)] or None
    return Path(resolve(ref, offline=offline, parts=wanted))


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "model_index.json").exists() or (
        (folder / "unet").is_dir() and (folder / "vae").is_dir()
    )


def _from_pretrained(cls, folder: Path, subfolder: str, dtype, allow_pickle: bool):
    """Load one component strictly from disk; safetensors only unless pickles are allowed."""
    try:
        return cls.from_pretrained(
            folder,
            subfolder=subfolder,
            local_files_only=True,
            use_safetensors=not allow_pickle,
            torch_dtype=dtype,
        )
    except OSError as exc:
        pickles = [p.name for p in (folder / subfolder).glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            first = folder / subfolder / pickles[0]
            raise WeightsError(
                f"{folder / subfolder}: only pickle weights ({', '.join(pickles)}), which can run code "
                f"on load; convert them with `diqa weights convert {first}` or pass --allow-pickle"
            ) from None
        raise WeightsError(f"{folder / subfolder}: cannot load {cls.__name__} ({exc})") from None


def _load_folder(folder: Path, dtype, allow_pickle: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not _is_diffusers_folder(folder):
        raise UsageError(
            f"{folder}: not a diffusers folder (expected model_index.json, or unet/ and vae/ subfolders)"
        )
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", dtype, allow_pickle)
    vae = _from_pretrained(AutoencoderKL, folder, "vae", dtype, allow_pickle)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.exists():
        scheduler_config = _read_json(scheduler_file)
    else:
        # Every SD 1.x / 2.x model shares one training schedule; take it from the matching config.
        scheduler_config = _read_json(
            _guess_config_dir(unet.config.cross_attention_dim, unet.config.block_out_channels[0], folder)
            / "scheduler"
            / "scheduler_config.json"
        )
    return unet, vae, scheduler_config


def _weight_files(component: Path) -> list[Path]:
    """The weight files from_pretrained reads for a component (default variant; shards listed
    in the index when sharded)."""
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = component / index_name
        if index.exists():
            return sorted({component / name for name in _read_json(index)["weight_map"].values()})
    found = [component / name for name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
    found = [p for p in found if p.exists()]
    if not found:
        found = [p for p in sorted(component.glob("*")) if p.suffix in PICKLE_SUFFIXES]
    return found


def _single_file_config(path: Path, config, allow_pickle: bool) -> Path:
    """The shipped (or given) config folder for a single-file checkpoint."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise WeightsError(
            f"{path}: pickle checkpoint ({path.suffix}) refused: loading it can run arbitrary code; "
            f"convert it once with `diqa weights convert {path}` (writes .safetensors) or pass --allow-pickle"
        )
    if path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        raise UsageError(
            f"{path}: not a checkpoint diqa reads (expected a .safetensors file or a diffusers folder)"
        )
    if config is not None:
        candidate = CONFIG_ROOT / str(config) if str(config) in SHIPPED_CONFIGS else Path(config)
        if (
            not (candidate / "unet" / "config.json").exists()
            or not (candidate / "vae" / "config.json").exists()
        ):
            raise UsageError(
                f"--config {config}: choose {', '.join(SHIPPED_CONFIGS)} or a folder with unet/config.json "
                "and vae/config.json"
            )
        return candidate
    shapes = _checkpoint_shapes(path, allow_pickle)
    if _LDM_CROSS_ATTN_KEY not in shapes or _LDM_CONV_IN_KEY not in shapes:
        raise WeightsError(
            f"{path}: not an original-layout Stable Diffusion checkpoint (no {_LDM_UNET}* U-Net keys)"
        )
    return _guess_config_dir(shapes[_LDM_CROSS_ATTN_KEY][1], shapes[_LDM_CONV_IN_KEY][0], path)


def _guess_config_dir(cross_attention_dim: int, first_channels: int, where) -> Path:
    for name in SHIPPED_CONFIGS:
        unet_config = _read_json(CONFIG_ROOT / name / "unet" / "config.json")
        if (unet_config["cross_attention_dim"], unet_config["block_out_channels"][0]) == (
            cross_attention_dim,
            first_channels,
        ):
            return CONFIG_ROOT / name
    raise UsageError(
        f"{where}: U-Net with cross-attention width {cross_attention_dim} and {first_channels} base channels "
        f"matches none of the shipped configs ({', '.join(SHIPPED_CONFIGS)}); pass --config FOLDER "
        "(a diffusers folder layout with unet/config.json, vae/config.json, scheduler/scheduler_config.json)"
    )


def _checkpoint_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple]:
    if path.suffix.lower() == ".safetensors":
        with _open_safetensors(path) as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {key: tuple(value.shape) for key, value in _read_checkpoint(path, ("",), allow_pickle).items()}


@contextlib.contextmanager
def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_checkpoint(path: Path, prefixes: tuple[str, ...], allow_pickle: bool) -> dict:
    """Only the tensors under ``prefixes``: the text encoder is not read until it is needed."""
    if path.suffix.lower() == ".safetensors":
        with _open_safetensors(path) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot unpickle safely
        raise WeightsError(
            f"{path}: cannot read as a plain state dict ({exc.__class__.__name__}: {exc})"
        ) from None
    state = state.get("state_dict", state)
    return {key: value for key, value in state.items() if key.startswith(prefixes)}


def _load_single_file(path: Path, config_dir: Path, dtype, allow_pickle: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    state = _read_checkpoint(path, (_LDM_UNET, _LDM_VAE), allow_pickle)
    models = []
    for cls, subfolder, what in ((UNet2DConditionModel, "unet", "U-Net"), (AutoencoderKL, "vae", "VAE")):
        # from_single_file casts with .to(dtype) itself and then warns about that very cast;
        # what matters (unfilled parameters) is checked below instead.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            model = cls.from_single_file(
                state, config=str(config_dir), subfolder=subfolder, local_files_only=True, torch_dtype=dtype
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise WeightsError(
                f"{path}: the {what} does not fit config {config_dir.name!r} ({exc})"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        _check_loaded(model, path, what)
        models.append(model)
    return models


def _check_loaded(model, path: Path, what: str) -> None:
    """Name parameters a single-file load left unfilled (they stay on the meta device)."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{path}: the {what} is incomplete, missing {', '.join(missing[:3])}{more}")


def _load_tokenizer(folder: Path, pad_token: str | None):
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


def _alphas_cumprod(scheduler_config: dict):
    """The training noise schedule's cumulative alphas, float32 (DDPM math is done in fp32)."""
    import torch
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    scheduler = DDPMScheduler(**{k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None})
    return scheduler.alphas_cumprod.to(torch.float32)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def _quiet_loading():
    """Model loading progress bars would land on stderr between diqa's own messages."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for module in (diffusers_logging, transformers_logging):
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            restore.append(module)
    try:
        yield
    finally:
        for module in restore:
            module.enable_progress_bar()


# --- text embeddings (cached) -------------------------------------------------------------


def _cache_key(kind: str, identity: str, prompts: list[str]) -> str:
    payload = json.dumps({"kind": kind, "weights": identity, "prompts": prompts}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _size_on_disk(source: Path) -> str:
    """The weights' size, for the loading message (a folder: its safetensors and pickle files)."""
    from diqa_cli.weights import human_size

    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES)]
    return human_size(sum(p.stat().st_size for p in files if p.is_file()))


def _read_cached(path: Path):
    if not path.exists():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["embeddings"]
    except Exception:  # a damaged cache entry is recomputed, never fatal
        return None


def _write_cached(path: Path, tensor) -> None:
    atomic_write(path, lambda tmp: save_safetensors({"embeddings": tensor.contiguous()}, tmp))


def _embed(tokenizer, encoder, prompts: list[str], device, *, pooled: bool, batch_size: int = 64):
    """Tokenize as the SD pipelines do (pad to 77, truncate) and run the encoder in float32;
    returns float32 on the CPU."""
    import torch

    outputs = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(
                prompts[start : start + batch_size],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            result = encoder(input_ids=tokens.input_ids.to(device))
            value = result.text_embeds if pooled else result.last_hidden_state
            outputs.append(value.float().cpu())
    return torch.cat(outputs)


def clip_text_features(ref: str, prompts, *, device="cpu", offline: bool = False):
    """(N, D) pooled, projected CLIP text features (``CLIPTextModelWithProjection.text_embeds``)
    for ``prompts``, float32 on ``device``. ``ref``: the manifest name ``clip-vit-large-patch14``
    or a local folder. Cached under ``DIQA_HOME/embeddings``; a hit does not load CLIP."""
    import torch

    torch_device = resolve_device(device) if not isinstance(device, torch.device) else device
    folder = _locate(str(ref), offline=home.offline_requested(offline))
    if not folder.is_dir():
        raise UsageError(
            f"{ref}: CLIP text features need a model folder (config.json, model.safetensors, tokenizer)"
        )
    files = {p.name: p for p in _weight_files(folder)}
    if not files:
        raise WeightsError(f"{folder}: no model.safetensors")
    prompts = [str(p) for p in prompts]
    path = (
        home.subdir("embeddings")
        / f"{_cache_key('clip-text-embeds', _combined_identity(files), prompts)}.safetensors"
    )
    cached = _read_cached(path)
    if cached is None:
        from transformers import CLIPTextModelWithProjection

        log.info("computing %d prompt features with CLIP %s (first use only; cached under %s)", len(prompts), ref,
                 path.parent)
        with _quiet_loading():
            encoder = _from_pretrained(CLIPTextModelWithProjection, folder, "", torch.float32, False)
            tokenizer = _load_tokenizer(folder, pad_token=None)
        encoder.to(torch_device).eval().requires_grad_(False)
        cached = _embed(tokenizer, encoder, prompts, torch_device, pooled=True)
        _write_cached(path, cached)
    return cached.to(torch_device)
