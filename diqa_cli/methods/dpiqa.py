"""DP-IQA teacher: Stable Diffusion 1.5 U-Net features guided by 1485 quality prompts."""

from diqa_cli.methods import BACKBONE_CORE, MethodSpec, ScoreNormalisation, TrainingDefaults, WeightsPart, register_method

_PAPER = (
    "Fu et al., DP-IQA: Utilizing Diffusion Prior for Blind Image Quality Assessment in the Wild, "
    "arXiv 2405.19996"
)

SPEC = register_method(
    MethodSpec(
        name="dpiqa",
        summary="DP-IQA teacher: SD 1.5 U-Net at t=1 with text and image adapters, conv/SE fusion head",
        paper=_PAPER,
        model="diqa_cli.models.dpiqa:DPIQA",
        default_backbone="sd15",
        resolution=512,
        resample="bilinear",  # torchvision Resize default in the released transform
        input_convention="[0,1] RGB straight into the VAE (released convention), 512x512 resize without crop",
        timesteps=(1,),
        score_range=(
            "unbounded regression output; the released code trains on MOS/100 (KonIQ: its CSV's MOS "
            "column / 100), diqa heads on MOS mapped to [0,1]; the sidecar's offset/scale gives the reported score"
        ),
        checkpoint_layout=(
            "released parameter names: unet.* (the fine-tuned U-Net, when finetune_unet), gamma, "
            "text_adapter.fc.{0,2}.*, img_adapter.* (diffusers FullAdapter), QFD.* (conv/SE fusion head); "
            "no VAE (frozen, taken from the backbone)"
        ),
        licence="CC BY-NC-SA 4.0 (released weights, non-commercial); diqa code Apache-2.0",
        released_weights=("dpiqa-koniq",),
        deviations=(
            "training keeps the best epoch by a val split only, never by the test split (released: the epoch "
            "with the best test correlation)",
            "VAE posterior mean instead of a sample, so the same image always gets the same score",
            "gradients reach the pixels through the VAE encoder too (released encodes under no_grad); "
            "scores are unchanged",
            "the unused BatchNorm, Dropout and 24-way classifier_dist are not built; converting released "
            "weights drops their keys",
            "the frozen VAE is not stored in checkpoints; it comes from the backbone (conversion drops vae.*)",
            "the 1485 prompt features are computed from the released word lists and cached by diqa (the "
            "released code loads a quality_embeddings.pth that is not in its repository)",
        ),
        # Released heads regress the training label divided by 100; scale 100 reports that label.
        released_normalisation=ScoreNormalisation(0.0, 100.0),
        feature_layers=("up.0", "up.1", "up.2", "up.3"),
        quality_map=(
            "per-location contribution of the QFD's 8-channel feature map to the score through the FC "
            "head (gradient x activation, summed over channels), on the latent grid (R/8)"
        ),
        training=TrainingDefaults(1e-5, 0.0, 16, 30, None, "DP-IQA train_dpiqa.py / build.py: Adam 1e-5, batch 16, 30 epochs"),
        default_for=("score",),
        weights=(
            WeightsPart("dpiqa-koniq", purpose="released head (KonIQ-10k)", role="head"),
            WeightsPart("sd15", BACKBONE_CORE, purpose="backbone (VAE and U-Net)", role="backbone"),
            WeightsPart("clip-vit-large-patch14", purpose="the 1485 prompt features (computed once, then cached)"),
        ),
        extra={
            "prompts": "1485 = 5 qualities x 9 scenes x 33 distortions, 'a photo of a {scene} with "
            "{distortion} artifacts, which is of {quality} quality'",
            "prompt_encoder": "clip-vit-large-patch14 (pooled, projected text features)",
        },
    )
)
