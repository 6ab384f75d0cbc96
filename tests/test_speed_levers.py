"""Speed levers change time, never scores: the shared prompt context (DP-IQA's adapter output and
every cross-attention layer's keys and values of it, computed once), ``--batch-size auto`` and
``--compile``."""

from __future__ import annotations

import os

import pytest


def _default_processors(model) -> None:
    """The model as it ran before the shared-context lever: diffusers' SDPA processor everywhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for unet in {id(u): u for u in (model.unet, model.backbone.unet)}.values():
        if not next(unet.parameters()).is_meta:
            unet.set_attn_processor(AttnProcessor2_0())


@pytest.fixture
def dpiqa(dpiqa_head):
    from diqa_cli.scoring import load_scorer

    model, _ = load_scorer(None, checkpoint=str(dpiqa_head), device="cpu", dtype="fp32", offline=True)
    return model


def _uncached(model, pixels):
    """Scores with every cache off: the default processors, and the adapter run on every call
    (train mode; DP-IQA has no dropout or batch norm, so only the cache differs)."""
    import torch

    _default_processors(model)
    model.train()
    try:
        with torch.no_grad():
            return model(pixels)
    finally:
        model.eval()


def test_shared_context_scores_equal_the_uncached_ones_bit_for_bit(dpiqa, tiny_pixels):
    import torch

    from diqa_cli.models.xattn import SharedContextAttnProcessor

    pixels = tiny_pixels(3)
    with torch.no_grad():
        cached = dpiqa(pixels)
        again = dpiqa(pixels)  # the second batch runs on the kept keys and values
    processors = [m.processor for name, m in dpiqa.unet.named_modules() if name.endswith("attn2")]
    assert processors and all(isinstance(p, SharedContextAttnProcessor) for p in processors)
    assert all(p._cache is not None for p in processors), "the cross-attention keys and values were not kept"
    assert torch.equal(cached, again)
    assert torch.equal(cached, _uncached(dpiqa, pixels))


def test_a_changed_adapter_or_projection_is_not_served_from_the_cache(dpiqa, tiny_pixels):
    import torch

    pixels = tiny_pixels(2)
    with torch.no_grad():
        before = dpiqa(pixels)
        dpiqa.gamma.add_(0.5)  # in place, as an optimiser step
        dpiqa.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(1.5)
        after = dpiqa(pixels)
    assert not torch.allclose(before, after)
    assert torch.equal(after, _uncached(dpiqa, pixels))


def test_gradients_through_the_shared_context_path_equal_the_uncached_ones(dpiqa, tiny_pixels):
    """Enhancement climbs the score's gradient with respect to the pixels, after scoring has
    filled the caches (even under inference mode)."""
    import torch

    with torch.inference_mode():
        dpiqa(tiny_pixels(2))
    pixels = tiny_pixels(2).requires_grad_(True)
    dpiqa(pixels).sum().backward()
    cached = pixels.grad.clone()
    _default_processors(dpiqa)
    dpiqa._context_cache = None
    pixels.grad = None
    dpiqa(pixels).sum().backward()
    assert torch.equal(cached, pixels.grad)


def test_training_recomputes_the_context_so_the_adapter_learns(dpiqa, tiny_pixels):
    import torch

    dpiqa.train().requires_grad_(True)
    dpiqa(tiny_pixels(2)).sum().backward()
    assert dpiqa.gamma.grad is not None and bool(dpiqa.gamma.grad.abs().sum() > 0)
    assert dpiqa.text_adapter.fc[0].weight.grad is not None
    key = dpiqa.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert key.grad is not None and bool(key.grad.abs().sum() > 0), "no gradient reached the U-Net's key projection"
    assert torch.isfinite(dpiqa.gamma.grad).all()


# --- --batch-size auto ----------------------------------------------------------------------------


def test_batch_size_parsing_names_the_choices():
    from diqa_cli.batching import parse_batch_size
    from diqa_cli.errors import UsageError

    assert parse_batch_size("AUTO") == "auto"
    assert parse_batch_size("12") == 12
    for bad in ("0", "-3", "eight", "2.5"):
        with pytest.raises(UsageError, match="at least 1, or auto"):
            parse_batch_size(bad)


def test_auto_batch_size_fits_free_memory_and_is_measured_once(dpiqa, monkeypatch):
    from diqa_cli import batching

    size = batching.auto_batch_size(dpiqa)
    assert 1 <= size <= 8
    import json

    from diqa_cli.home import diqa_home

    (kept,) = json.loads((diqa_home() / "batch_footprints.json").read_text()).values()
    per_image = kept["per_image"]
    # Less free memory than one image takes: still one image, never zero.
    monkeypatch.setattr(batching, "_free_bytes", lambda device: per_image // 2)
    monkeypatch.setattr(batching, "_measure", lambda model: pytest.fail("the footprint was measured again"))
    assert batching.auto_batch_size(dpiqa) == 1
    monkeypatch.setattr(batching, "_free_bytes", lambda device: per_image * 5)
    assert batching.auto_batch_size(dpiqa) == 4  # 80% of five images' worth


def test_score_with_batch_size_auto_scores_like_a_fixed_batch(run_main, dpiqa_head, tiny_images, tmp_path, model_home):
    paths = []
    for i, image in enumerate(tiny_images(3)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    code, auto, _ = run_main(["score", "-c", str(dpiqa_head), "-b", "auto", "-f", "csv", *paths], home=model_home)
    assert code == 0
    code, fixed, _ = run_main(["score", "-c", str(dpiqa_head), "-b", "1", "-f", "csv", *paths], home=model_home)
    assert code == 0

    def scores(text):
        return [float(line.split(",")[2]) for line in text.strip().splitlines()[1:]]

    # Other batch sizes reorder float sums: equal to float tolerance, not bit for bit.
    assert len(scores(auto)) == 3
    assert scores(auto) == pytest.approx(scores(fixed), rel=1e-5)
    code, _, err = run_main(["score", "-c", str(dpiqa_head), "-b", "none", *paths], home=model_home)
    assert code == 2 and "--batch-size 'none'" in err


# --- --compile -------------------------------------------------------------------------------------


def test_compile_without_a_compiler_is_one_usage_error(run_main, dpiqa_head, tiny_images, tmp_path, model_home, monkeypatch):
    path = tmp_path / "a.png"
    tiny_images(1)[0].save(path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    code, out, err = run_main(["score", "-c", str(dpiqa_head), "--compile", "--device", "cpu", str(path)], home=model_home)
    assert code == 2
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("diqa: error:")]
    assert len(errors) == 1 and "--compile on the CPU needs a C++ compiler" in errors[0]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("DIQA_TEST_COMPILE"),
                    reason="compiling takes minutes to most of an hour on 2 CPU cores: `make test-compile` runs it")
def test_compiled_student_scores_match_the_eager_ones(tiny_pixels):
    """torch.compile (inductor) reorders floating-point work: scores agree to float tolerance."""
    import shutil

    import torch

    from diqa_cli.compiling import compile_model, compiled_modules
    from diqa_cli.models.dpiqa_student import DPIQAStudent

    if not shutil.which("g++") and not shutil.which("clang++"):
        pytest.skip("no C++ compiler for inductor on the CPU")
    torch.manual_seed(0)
    model = DPIQAStudent(None, **DPIQAStudent.tiny_config()).eval().freeze()
    pixels = tiny_pixels(2, model.resolution)
    with torch.no_grad():
        eager = model(pixels)
    compile_model(model, batch_size=2)
    assert compiled_modules(model)
    with torch.no_grad():
        compiled = model(pixels)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
