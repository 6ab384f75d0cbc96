"""LGDM with Perceptual Manifold Guidance: hyperfeatures of a perceptually guided DDIM trajectory.

No code was released for this paper: diqa's implementation is a reconstruction from its abstract
and Figure 1 (see diqa_cli/models/lgdm.py for every choice it makes).
"""

from diqa_cli.methods import BACKBONE_CORE, MethodSpec, TrainingDefaults, WeightsPart, register_method

LGDM_TIMESTEPS = (100, 75, 50, 25)
LGDM_LAYERS = ("down.1", "down.2", "mid", "up.0", "up.1", "up.2", "up.3")

SPEC = register_method(
    MethodSpec(
        name="lgdm",
        aliases=("pmg",),
        summary=(
            "LGDM/PMG: DDIM from the noised input latent (t=100 down to 25) with Perceptual Manifold "
            "Guidance (pixel MSE + LPIPS-VGG + DISTS on the decoded Tweedie estimate); multi-scale "
            "multi-timestep U-Net hyperfeatures, learned mixing, MLP head (reconstruction, no released code)"
        ),
        paper=(
            "Saini, Liao, Ye, Bovik, Latent Guidance in Diffusion Models for Perceptual Evaluations, "
            "arXiv 2506.00327 (ICML 2025); no released code — reconstruction"
        ),
        model="diqa_cli.models.lgdm:LGDM",
        default_backbone="sd15",
        resolution=512,
        resample="bicubic",
        input_convention="[-1,1]",
        timesteps=LGDM_TIMESTEPS,
        score_range="unbounded regression output; trained on MOS scaled to [0,1] (the sidecar maps it back)",
        checkpoint_layout=(
            "aggregator.projections.{l}.{0,1}.* (LayerNorm + Linear per U-Net layer, shared over timesteps), "
            "aggregator.mixing (timesteps x layers logits), regressor.{0,2}.* (MLP); the frozen LDM and "
            "perceptual networks are not stored"
        ),
        licence="no released code or weights; diqa code Apache-2.0 (SD 1.5 under CreativeML OpenRAIL-M)",
        released_weights=(),
        reconstruction=True,
        deviations=(
            "reconstruction: the paper's guidance formula, step sizes, layers and regressor were not published "
            "as code; diqa's choices are documented in diqa_cli/models/lgdm.py",
            "guidance gradient taken with respect to the Tweedie estimate z0|t by default (on-manifold, as Figure 1 "
            "draws it); guidance_wrt='zt' takes it with respect to z_t through the U-Net instead",
            "guidance step = guidance_scale x gradient x latent elements per image (the paper gives no step size)",
            "deterministic: VAE posterior mean and one noise tensor drawn from the recorded seed",
            "gradients with respect to the pixels treat each guidance direction as a constant (no second-order terms)",
        ),
        draws_noise=True,
        weights=(
            WeightsPart("sd15", BACKBONE_CORE, purpose="backbone", role="backbone"),
            WeightsPart("vgg16-imagenet", purpose="VGG16 trunk of LPIPS-VGG and DISTS (perceptual guidance)"),
            WeightsPart("dists", purpose="DISTS alpha/beta weights (perceptual guidance)"),
        ),
        feature_layers=LGDM_LAYERS,
        # No released code: diqa's choice for a small regressor on frozen hyperfeatures.
        quality_map=(
            "blur occlusion: score(x) - score(x with one cell of a 4 x 4 grid blurred), per cell (16 "
            "extra scorings; the guided trajectory's gradients do not localise damage)"
        ),
        training=TrainingDefaults(1e-3, 1e-4, 32, 50, 1.0, "diqa's choice (LGDM has no released code)"),
        default_for=("enhance",),
        extra={
            "guidance": "lambda_m * MSE(y, D(z0|t)) + sum_k lambda_k * d_k(y, D(z0|t)), d_k in LPIPS-alex/vgg, DISTS; "
            "gradient w.r.t. z0|t (default) or z_t",
            "perceptual_weights": {"lpips-vgg": 1.0, "dists": 1.0},
            "perceptual_backbones": ["vgg16-imagenet (torchvision)", "dists (alpha/beta)"],
            "unet_evaluations_per_image": len(LGDM_TIMESTEPS),
            "guided_steps_per_image": len(LGDM_TIMESTEPS) - 1,
            "training": "frozen features computed once per image; aggregation + MLP head trained with MSE",
        },
    )
)
