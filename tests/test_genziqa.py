"""GenzIQA on the tiny backbone: scores, the pooled-logit processor, training and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from diqa_cli.errors import WeightsError


@pytest.fixture(scope="module")
def genziqa(tiny_backbone):
    from diqa_cli.models.genziqa import GenzIQA

    return GenzIQA(tiny_backbone, **GenzIQA.tiny_config()).eval()


def _perturb_lora(model, seed: int) -> None:
    """Give the LoRA up-matrices (zero at initialisation) random values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_spec_matches_the_model_defaults(genziqa):
    from diqa_cli.methods import get_method, load_model_class

    spec = get_method("genziqa")
    assert load_model_class(spec) is type(genziqa)
    assert spec.timesteps == (9, 21, 33, 45, 57, 69, 81, 93)
    assert tuple(genziqa.config["timesteps"]) == spec.timesteps
    assert spec.default_backbone == "sd21-base" and spec.input_convention == "CLIP mean/std"
    assert spec.extra["unet_evaluations_per_image"] == 16
    assert all(line and "\n" not in line for line in spec.deviations)


def test_scores_are_deterministic_and_batch_independent(genziqa, tiny_backbone, tiny_pixels):
    from diqa_cli.models.genziqa import GenzIQA

    pixels = tiny_pixels(2)
    with torch.no_grad():
        scores = genziqa(pixels)
        again = genziqa(pixels)
        singles = torch.cat([genziqa(pixels[i : i + 1]) for i in range(2)])
        # A fresh model from the same config is the same model (seeded context, LoRA and noise),
        # and a smaller U-Net batch only changes how the 32 evaluations are chunked (3 pairs a call).
        rebuilt = GenzIQA(tiny_backbone, unet_batch=6).eval()(pixels)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert torch.equal(scores, again)
    torch.testing.assert_close(singles, scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rebuilt, scores, atol=1e-5, rtol=1e-5)
    assert scores[0] != scores[1]  # different images, different scores


def test_one_layer_score_per_cross_attention_module(genziqa, tiny_backbone, tiny_pixels):
    modules = dict(tiny_backbone.unet.named_modules())
    attn2 = [name for name in modules if name.endswith("attn2")]
    assert sorted(genziqa.feature_layers()) == sorted(attn2)
    # Execution order: down blocks, then the mid block, then up blocks.
    stages = [name.split(".")[0] for name in genziqa.feature_layers()]
    assert stages == sorted(stages, key=["down_blocks", "mid_block", "up_blocks"].index)

    pixels = tiny_pixels(2)
    with torch.no_grad():
        layers, queries = genziqa.layer_scores(pixels, timesteps=[9, 34, 59, 84], return_query_features=True)
        # The image score is the mean of the layer scores over the 8 default timesteps.
        torch.testing.assert_close(genziqa.layer_scores(pixels[:1]).mean(dim=1), genziqa(pixels[:1]))
    assert layers.shape == (2, len(attn2))
    assert list(queries) == genziqa.feature_layers()
    for name, features in queries.items():
        assert features.shape == (2, 4, 2, modules[name].to_q.out_features)


def test_noise_bank_comes_from_the_recorded_seed(genziqa, tiny_pixels):
    """The k-th timestep's noise is the k-th standard-normal draw (latent-shaped) from a CPU
    generator seeded with ``seed``; passing other noise changes the scores."""
    pixels = tiny_pixels(1)
    generator = torch.Generator().manual_seed(genziqa.config["seed"])
    latent_shape = (4, 8, 8)  # 64 px through the tiny VAE's factor 8
    bank = torch.stack([torch.randn(latent_shape, generator=generator) for _ in range(2)])
    with torch.no_grad():
        default = genziqa.layer_scores(pixels, timesteps=[21, 45])
        explicit = genziqa.layer_scores(pixels, timesteps=[21, 45], noise=bank)
        other = genziqa.layer_scores(pixels, timesteps=[21, 45], noise=bank.flip(0))
    assert torch.equal(default, explicit)
    assert (other - default).abs().max() > 1e-3


def test_prompts_enter_attention_symmetrically_and_the_bias_antisymmetrically(tiny_backbone, tiny_pixels):
    """Swapping the two prompts keeps the attention term (a mean over both prompt rows) and
    negates the denoising-error difference, which is the same for every layer."""
    from diqa_cli.models.genziqa import GenzIQA

    pixels = tiny_pixels(2)
    straight = GenzIQA(tiny_backbone, timesteps=[9, 57]).eval()
    swapped = GenzIQA(tiny_backbone, timesteps=[9, 57], prompts=("Bad Photo.", "Good Photo.")).eval()
    with torch.no_grad():
        a, b = straight.layer_scores(pixels), swapped.layer_scores(pixels)
    bias = (a - b) / 2
    torch.testing.assert_close(bias, bias[:, :1].expand_as(bias), atol=1e-4, rtol=0)
    assert bias.abs().min() > 1e-3


def _standalone_attention(heads=2, dim_head=8, query_dim=16, context_dim=12, seed=0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head).eval()


def _naive_pooled_logits(attn, hidden, context, temperature, mask=None):
    """Per image and head, in float64, with no softmax: log Σ_positions exp(λ·q·k/√d) / λ."""
    query = attn.to_q(hidden).double()
    key = attn.to_k(context).double()
    batch, tokens, heads = hidden.shape[0], context.shape[1], attn.heads
    head_dim = query.shape[-1] // heads
    out = torch.empty(batch, heads, tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            q = query[b, :, h * head_dim : (h + 1) * head_dim]
            k = key[b, :, h * head_dim : (h + 1) * head_dim]
            logits = q @ k.T / math.sqrt(head_dim)
            if mask is not None:
                logits = logits + mask[b].double()
            out[b, h] = torch.log(torch.exp(temperature * logits).sum(dim=0)) / temperature
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_pooled_logit_processor_keeps_the_sdpa_output(masked):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diqa_cli.models.xattn import CrossAttentionRecorder, PooledLogitAttnProcessor

    attn = _standalone_attention()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 20, 16, generator=generator)
    context = torch.randn(3, 7, 12, generator=generator)
    mask = None
    if masked:  # additive bias pushing down the last two tokens of image 1
        mask = torch.zeros(3, 1, 7)
        mask[1, :, 5:] = -50.0

    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        reference = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        recorder = CrossAttentionRecorder()
        attn.set_processor(PooledLogitAttnProcessor("layer", recorder, temperature=0.14))
        idle = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        with recorder:
            recorded = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        naive = _naive_pooled_logits(attn, hidden, context, 0.14, mask)

    torch.testing.assert_close(idle, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(recorded, reference, atol=1e-6, rtol=1e-6)
    assert recorder.pooled["layer"].shape == (3, 2, 7)
    torch.testing.assert_close(recorder.pooled["layer"].double(), naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(recorder.query_means["layer"], attn.to_q(hidden).mean(dim=1))
    # Outside ``with recorder`` nothing was recorded.
    recorder.clear()
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=context)
    assert not recorder.pooled


def test_processor_sees_the_lora_layers(tiny_backbone):
    """With peft's LoRA on the projections, output and pooled logits follow the adapted
    weights: equal to the naive computation through the wrapped modules, and different
    from the base weights once the LoRA is non-zero."""
    from diqa_cli.models.genziqa import GenzIQA

    model = GenzIQA(tiny_backbone)
    _perturb_lora(model, seed=3)
    name = model.feature_layers()[0]
    attn = dict(model.unet.named_modules())[name]
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 10, attn.to_q.in_features, generator=generator)
    context = torch.randn(2, 77, tiny_backbone.unet.config.cross_attention_dim, generator=generator)
    base = dict(tiny_backbone.unet.named_modules())[name]
    with torch.no_grad():
        with model._recorder:
            adapted = attn(hidden, encoder_hidden_states=context)
        pooled = model._recorder.pooled[name]
        original = base(hidden, encoder_hidden_states=context)
        naive = _naive_pooled_logits(attn, hidden, context, 0.14)
        base_naive = _naive_pooled_logits(base, hidden, context, 0.14)
    torch.testing.assert_close(pooled.double(), naive, atol=1e-4, rtol=1e-5)
    assert (pooled.double() - base_naive).abs().max() > 1e-3
    assert (adapted - original).abs().max() > 1e-4


def test_training_changes_only_lora_and_context(tiny_backbone, tiny_pixels):
    from diqa_cli.models.genziqa import GenzIQA

    model = GenzIQA(tiny_backbone).train()
    trainable = set(model.trainable_parameter_names())
    layers = len(model.feature_layers())
    assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 1 + layers * 4 * 2  # ctx + (q, k, v, out) x (A, B) per layer
    assert all(name == "ctx" or ".attn2." in name and ".lora_" in name for name in trainable)

    _, text_encoder = tiny_backbone.text_encoder()
    frozen_parts = {"unet": tiny_backbone.unet, "vae": tiny_backbone.vae, "text": text_encoder}
    before = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in frozen_parts.items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}

    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=1e-2)
    pixels, targets = tiny_pixels(2), torch.tensor([0.2, 0.8])
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model.training_loss(pixels, targets, generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)

    after = model.state_dict()
    changed = {k for k in model_before if not torch.equal(model_before[k], after[k])}
    assert changed == trainable  # every LoRA matrix (A moves from the 2nd step) and ctx, nothing else
    for part, module in frozen_parts.items():
        assert all(torch.equal(before[part][k], v) for k, v in module.state_dict().items()), part
    # The backbone's own U-Net got neither LoRA layers nor new attention processors.
    assert not any("lora" in name for name, _ in tiny_backbone.unet.named_parameters())
    assert not any(type(p).__name__ == "PooledLogitAttnProcessor" for p in tiny_backbone.unet.attn_processors.values())


def test_checkpoint_round_trip(tiny_backbone, tiny_pixels):
    from diqa_cli.models.genziqa import GenzIQA

    trained = GenzIQA(tiny_backbone).eval()
    _perturb_lora(trained, seed=5)
    with torch.no_grad():
        trained.ctx.add_(0.01)
    state = trained.checkpoint_state_dict()
    layers = trained.feature_layers()
    expected = {"ctx"} | {
        f"{layer}.processor.{target}_lora.{matrix}.weight"
        for layer in layers
        for target in ("to_q", "to_k", "to_v", "to_out")
        for matrix in ("down", "up")
    }
    assert set(state) == expected  # the released names, nothing else

    pixels = tiny_pixels(2)
    # Same config (the sidecar's), so only the loaded tensors can make the scores agree.
    fresh = GenzIQA(tiny_backbone).eval()
    with torch.no_grad():
        reference = trained(pixels)
        before_load = fresh(pixels)  # caches fresh's prompt context, which the load must refresh
    fresh.load_checkpoint_state_dict(state)
    with torch.no_grad():
        loaded = fresh(pixels)
    assert (before_load - reference).abs().max() > 1e-3
    assert torch.equal(loaded, reference)

    with pytest.raises(WeightsError, match="missing keys"):
        fresh.load_checkpoint_state_dict({k: v for k, v in state.items() if k != "ctx"})
    with pytest.raises(WeightsError, match="unexpected keys"):
        fresh.load_checkpoint_state_dict({**state, "text_encoder.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="wrong shapes"):
        fresh.load_checkpoint_state_dict({**state, "ctx": torch.zeros(3, 3)})


def test_gradients_reach_the_pixels_after_inference_mode_scoring(tiny_backbone, tiny_pixels):
    """Enhancement climbs the score's gradient; scoring first under inference_mode (which
    fills the prompt-context and noise caches) must not break it."""
    from diqa_cli.models.genziqa import GenzIQA

    model = GenzIQA(tiny_backbone, timesteps=[9, 57]).eval()
    pixels = tiny_pixels(1)
    with torch.inference_mode():
        model(pixels)
    pixels.requires_grad_(True)
    model(pixels).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().max() > 0
