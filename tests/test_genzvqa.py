"""GenzVQA and its SlowFast on the tiny backbone and the tiny SlowFast: the network's released key
names, the modulator, scores, checkpoints, training, and `diqa score-video`."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import numpy as np
import pytest
import torch

from diqa_cli.errors import UsageError, WeightsError
from test_videoio import encode  # the clip builder the decoding tests use

# pytorchvideo.models.hub.slowfast_r50(), the builder that loads the model zoo's
# SLOWFAST_8x8_R50.pyth strictly: 662 tensors; SHA-256 of its sorted "name shape" lines.
ZOO_R50_TENSORS = 662
ZOO_R50_FINGERPRINT = "b64258d537dd0d36112ed878c11546389102ac459f198d1924d33a3dbf2ebe30"
# A few of those names and shapes, checked by hand against pytorchvideo 0.1.5's slowfast.py.
ZOO_R50_SAMPLES = {
    "blocks.0.multipathway_blocks.0.conv.weight": (64, 3, 1, 7, 7),
    "blocks.0.multipathway_blocks.1.conv.weight": (8, 3, 5, 7, 7),
    "blocks.0.multipathway_fusion.conv_fast_to_slow.weight": (16, 8, 7, 1, 1),
    "blocks.1.multipathway_blocks.0.res_blocks.0.branch1_conv.weight": (256, 80, 1, 1, 1),
    "blocks.4.multipathway_blocks.1.res_blocks.2.branch2.conv_c.weight": (256, 64, 1, 1, 1),
    "blocks.4.multipathway_blocks.0.res_blocks.2.branch2.norm_c.num_batches_tracked": (),
    "blocks.6.proj.weight": (400, 2304),
}
# GenzVQA's released modulator block names (genzvqa_train.py, block_names), in order.
RELEASED_BLOCKS = [
    "down_block_0_attn_0", "down_block_0_attn_1", "down_block_1_attn_0", "down_block_1_attn_1",
    "down_block_2_attn_0", "down_block_2_attn_1", "mid_block_attn_0",
    "up_block_1_attn_0", "up_block_1_attn_1", "up_block_1_attn_2",
    "up_block_2_attn_0", "up_block_2_attn_1", "up_block_2_attn_2",
    "up_block_3_attn_0", "up_block_3_attn_1", "up_block_3_attn_2",
]


def _fingerprint(state) -> str:
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny networks are overhead-bound: one intra-op thread is faster than two fighting over a
    busy 2-core machine. The previous setting is restored for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slowfast_file(tiny_dir):
    from diqa_cli.models.slowfast import write_tiny_slowfast

    return write_tiny_slowfast(tiny_dir)


@pytest.fixture(scope="module")
def slowfast(slowfast_file):
    from diqa_cli.models.slowfast import load_slowfast

    return load_slowfast(str(slowfast_file))


@pytest.fixture(scope="module")
def genzvqa(tiny_backbone):
    from diqa_cli.models.genzvqa import GenzVQA

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = GenzVQA(tiny_backbone, **GenzVQA.tiny_config())
    # Give the LoRA up-matrices (zero at initialisation) values, as training would.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        "h264": str(encode(folder / "a.mp4", "libx264", noise=True)),
        "vp9": str(encode(folder / "b.webm", "libvpx-vp9")),
    }


@pytest.fixture(scope="module")
def video_input(genzvqa, slowfast, videos):
    from diqa_cli.pipelines.videos import load_video_input

    return load_video_input(videos["h264"], genzvqa, slowfast, max_frames=4)


# --- SlowFast: the model zoo's network and key names ---------------------------------------------


def test_r50_is_the_model_zoo_network_key_for_key():
    import warnings

    from diqa_cli.models.slowfast import SlowFastFeatures

    ours = SlowFastFeatures().net.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorchvideo.models.hub import slowfast_r50

        zoo = slowfast_r50(pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in zoo.items()}
    assert len(ours) == ZOO_R50_TENSORS and _fingerprint(ours) == ZOO_R50_FINGERPRINT
    for name, shape in ZOO_R50_SAMPLES.items():
        assert tuple(ours[name].shape) == shape


def test_tiny_slowfast_has_the_zoo_key_names_and_feature_widths(slowfast):
    from diqa_cli.models.slowfast import SlowFastFeatures

    assert set(slowfast.net.state_dict()) == set(SlowFastFeatures().net.state_dict())
    assert SlowFastFeatures().feature_dims == (2048, 256)
    assert slowfast.feature_dims == (256, 32)
    clips = torch.randn(2, 3, slowfast.clip_frames, slowfast.crop_size, slowfast.crop_size)
    slow, fast = slowfast.extract_features(clips)
    assert slow.shape == (2, 256) and fast.shape == (2, 32)
    assert not any(p.requires_grad for p in slowfast.parameters())
    assert not slowfast.train().training  # frozen batch norm, whatever a caller asks
    again, _ = slowfast.extract_features(clips[:1])
    torch.testing.assert_close(again, slow[:1], atol=1e-5, rtol=1e-5)  # eval mode: batch-independent


def test_zoo_checkpoint_converts_and_loads_strictly(slowfast, slowfast_file, tmp_path):
    from diqa_cli.models.slowfast import load_slowfast
    from diqa_cli.weights import convert

    # The model zoo's layout: the state dict under "model_state" beside training bookkeeping.
    released = tmp_path / "SLOWFAST_8x8_R50.pyth"
    torch.save({"model_state": slowfast.net.state_dict(), "epoch": 196, "cfg": "MODEL:\n  ARCH: slowfast\n"}, released)
    converted = convert(released, tmp_path / "SLOWFAST_8x8_R50.safetensors")
    converted.with_suffix(".json").write_text(slowfast_file.with_suffix(".json").read_text())
    loaded = load_slowfast(str(converted))
    clips = torch.randn(1, 3, slowfast.clip_frames, slowfast.crop_size, slowfast.crop_size)
    for a, b in zip(loaded.extract_features(clips), slowfast.extract_features(clips)):
        assert torch.equal(a, b)

    from safetensors.torch import load_file, save_file

    state = load_file(str(converted))
    dropped = "blocks.2.multipathway_blocks.1.res_blocks.0.branch2.conv_b.weight"
    del state[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    broken.with_suffix(".json").write_text(slowfast_file.with_suffix(".json").read_text())
    with pytest.raises(WeightsError, match="missing keys.*branch2.conv_b"):
        load_slowfast(str(broken))
    with pytest.raises(WeightsError, match="diqa weights convert"):
        load_slowfast(str(released))


def test_manifest_slowfast_offline_names_the_missing_file():
    from diqa_cli.models.slowfast import load_slowfast

    with pytest.raises(WeightsError, match="slowfast-r50-k400"):
        load_slowfast("slowfast-r50-k400", offline=True)


# --- GenzVQA -------------------------------------------------------------------------------------


def test_spec_and_released_block_names(genzvqa):
    from diqa_cli.methods import get_method, list_methods
    from diqa_cli.models.genzvqa import released_block_name

    spec = get_method("genzvqa")
    assert spec.input_kind == "video" and spec.timesteps == (9, 34, 59, 84)
    assert spec in list_methods(kind="video") and spec not in list_methods(kind="image")
    assert tuple(genzvqa.config["timesteps"]) == spec.timesteps
    sd21_layers = [
        f"{stem}.attentions.{i}.transformer_blocks.0.attn2"
        for stem, count in (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1),
                            ("up_blocks.1", 3), ("up_blocks.2", 3), ("up_blocks.3", 3))
        for i in range(count)
    ]
    assert [released_block_name(layer) for layer in sd21_layers] == RELEASED_BLOCKS
    # The tiny U-Net has SD's layout at fewer layers: its names are a subset, in order.
    tiny = [released_block_name(layer) for layer in genzvqa.feature_layers()]
    assert tiny == [name for name in RELEASED_BLOCKS if name in tiny]


def test_video_score_shapes_determinism_and_frame_batching(genzvqa, video_input):
    frames, (slow, fast) = video_input.frames, video_input.clip_features
    assert frames.shape == (4, 3, 64, 64) and slow.shape == (3, 256) and fast.shape == (3, 32)
    layers = len(genzvqa.feature_layers())
    with torch.no_grad():
        result = genzvqa.video_scores([frames], slow, fast)
        again = genzvqa.score_video(frames, slow, fast)
        batched = genzvqa.video_scores([frames[:3], frames[3:]], slow, fast)
    assert result.frame_scores.shape == (4,) and result.gamma.shape == (layers,)
    assert result.layer_scores.shape == (layers,) and result.similarities.shape == (layers, 2)
    assert torch.isfinite(result.score) and torch.equal(result.score, again)
    torch.testing.assert_close(result.frame_scores.mean(), result.score)  # the video score is the frames' mean
    # float32 sums in another order (batches of 3 and 1 instead of 4): 1.3e-5 relative was seen once
    # the frames became the exact 8-bit resize's; a batching bug would move it by 1e-2 or more.
    torch.testing.assert_close(batched.score, result.score, atol=1e-5, rtol=1e-4)
    assert result.frame_scores.std() > 0  # different frames, different scores


def test_modulator_follows_the_released_computation(tiny_backbone, video_input):
    """γ_l = ReLU(Linear([s_slow, s_fast])), s = mean over prompts, heads, frames and clips of the
    per-head query·key products times 8, recomputed here with an explicit head split."""
    from diqa_cli.models.genzvqa import GenzVQA

    model = GenzVQA(tiny_backbone, **{**GenzVQA.tiny_config(), "head_dim": 16}).eval()
    with torch.no_grad():
        layers, queries = model.frame_features(video_input.frames)
        gamma, terms = model.modulate(queries, *video_input.clip_features)
        for i, layer in enumerate(model.feature_layers()):
            block = model._blocks[layer]
            query = queries[layer]  # (F, 2, C)
            width = query.shape[-1]
            heads = width // 16
            expected = []
            slow, fast = video_input.clip_features
            for keys, projection in ((slow, model.slowAttn[block]), (fast, model.fastAttn[block])):
                key = projection(keys)  # (N, C)
                q = query.reshape(-1, heads, 16).permute(1, 0, 2)  # (heads, F*2, 16)
                k = key.reshape(-1, heads, 16).permute(1, 0, 2)  # (heads, N, 16)
                expected.append(((q @ k.transpose(1, 2)) * 8).mean())  # logits x 8: the released "/ 64 ** -0.5"
            expected = torch.stack(expected)
            torch.testing.assert_close(terms[i], expected, atol=1e-4, rtol=1e-4)
            linear = model.linearBlocks[block]
            torch.testing.assert_close(gamma[i], torch.relu(linear.weight[0] @ expected + linear.bias[0]))
        score = model._video_score(layers, queries, *video_input.clip_features).score
    torch.testing.assert_close(score, (layers * gamma).mean(dim=1).mean())


def test_modulator_and_slowfast_features_change_the_score(genzvqa, video_input):
    from diqa_cli.models.genziqa import GenzIQA

    frames, (slow, fast) = video_input.frames, video_input.clip_features
    with torch.no_grad():
        modulated = genzvqa.score_video(frames, slow, fast)
        other_motion = genzvqa.score_video(frames, slow * 0.5 + 1.0, fast.flip(0) + 1.0)
        saved = {k: v.clone() for k, v in genzvqa.linearBlocks.state_dict().items()}
        try:
            for linear in genzvqa.linearBlocks.values():  # γ = 1 on every layer: no modulation
                linear.weight.zero_()
                linear.bias.fill_(1.0)
            plain = genzvqa.score_video(frames, slow, fast)
            # With γ = 1 the video score is GenzIQA at the video timesteps averaged over frames.
            image_scores = GenzIQA.layer_scores(genzvqa, frames).mean(dim=1)
        finally:
            genzvqa.linearBlocks.load_state_dict(saved)
    torch.testing.assert_close(plain, image_scores.mean(), atol=1e-5, rtol=1e-5)
    assert not torch.isclose(modulated, plain)
    assert not torch.isclose(other_motion, modulated)


def test_forward_on_images_says_what_to_use(genzvqa, tiny_pixels):
    with pytest.raises(UsageError, match="score-video"):
        genzvqa(tiny_pixels(1))


def test_checkpoint_round_trip_names_the_slowfast(genzvqa, slowfast, video_input, tmp_path, tiny_backbone):
    from diqa_cli.checkpoint import load_head, read_sidecar, save_head

    genzvqa.check_slowfast(slowfast)  # records the SlowFast weights' hash in the config
    path = save_head(genzvqa, tmp_path / "genzvqa.safetensors", normalisation={"offset": 1.0, "scale": 4.0})
    sidecar = read_sidecar(path)
    assert sidecar["config"]["slowfast"] == "../slowfast.safetensors"
    assert sidecar["config"]["slowfast_sha256"] == slowfast.identity
    state = genzvqa.checkpoint_state_dict()
    assert "ctx" in state and any(".processor.to_q_lora.up.weight" in k for k in state)
    for part in ("slowAttn", "fastAttn"):
        for piece in ("norm.weight", "k_down.weight", "k_up.bias"):
            assert f"{part}.down_block_0_attn_0.{piece}" in state
    assert "linearBlocks.mid_block_attn_0.weight" in state
    assert not any(k.startswith("unet.") for k in state)  # the frozen U-Net stays out

    loaded, _ = load_head(path, backbone=tiny_backbone)
    with torch.no_grad():
        expected = genzvqa.score_video(video_input.frames, *video_input.clip_features)
        actual = loaded.score_video(video_input.frames, *video_input.clip_features)
    torch.testing.assert_close(actual, expected)

    with pytest.raises(WeightsError, match="unexpected keys"):
        loaded.load_checkpoint_state_dict({**state, "slowAttn.extra.weight": torch.zeros(1)})


def test_a_slowfast_of_other_widths_is_refused(genzvqa):
    from diqa_cli.models.slowfast import SlowFastFeatures, slowfast_config

    wider = SlowFastFeatures(slowfast_config(width=16, num_classes=4, clip_frames=8, crop_size=32))
    with pytest.raises(UsageError, match="256-d slow and 32-d fast"):
        genzvqa.check_slowfast(wider)


def test_training_reaches_prompt_lora_and_modulator_only(tiny_backbone, slowfast, videos):
    from types import SimpleNamespace

    from diqa_cli.models.genziqa import GenzIQA
    from diqa_cli.models.genzvqa import GenzVQA
    from diqa_cli.pipelines.datasets import VideoSet

    model = GenzVQA(tiny_backbone, **GenzVQA.tiny_config())
    image_head = GenzIQA(tiny_backbone, seed=7)
    model.load_init_state_dict(image_head.checkpoint_state_dict(), "genziqa")  # start from a GenzIQA head
    assert torch.equal(model.ctx, image_head.ctx)

    rows = [SimpleNamespace(path=videos["h264"]), SimpleNamespace(path=videos["vp9"]), SimpleNamespace(path="/no/such.mp4")]
    model.adopt_clip_encoder(slowfast)
    data = VideoSet(rows, model, slowfast, max_frames=2, max_clips=2)
    assert len(data) == 2 and "no such file" in next(iter(data.failed.values()))
    assert (model.config["slowfast"], model.config["slowfast_sha256"]) == (slowfast.ref, slowfast.identity)
    batch, kept = data.batch([0, 1])
    assert kept == [0, 1] and [tuple(f.shape) for f in batch.frames] == [(2, 3, 64, 64)] * 2
    assert [tuple(slow.shape) for slow, _ in batch.clip_features] == [(2, 256)] * 2

    names = set(model.trainable_parameter_names())
    params = dict(model.named_parameters())
    frozen_before = {n: p.detach().clone() for n, p in params.items() if n not in names}
    trained_before = {n: params[n].detach().clone() for n in names}
    for n in names:
        params[n].requires_grad_(True)
    optimiser = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    model.train()
    loss = model.training_loss(batch, torch.tensor([0.2, 0.8]), torch.Generator().manual_seed(0))
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert params["ctx"].grad.abs().sum() > 0
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names if n.startswith("slowAttn."))
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names if "lora_B" in n)
    assert all(torch.equal(p, params[n].detach()) for n, p in frozen_before.items())
    changed = {n for n in names if not torch.equal(trained_before[n], params[n].detach())}
    assert "ctx" in changed and any(n.startswith("linearBlocks.") for n in changed)
    with pytest.raises(UsageError, match="VideoBatch"):
        model.training_loss(torch.zeros(1, 3, 64, 64), torch.zeros(1), torch.Generator())


# --- the scoring pipeline and `diqa score-video` ---------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_dir, tiny_backbone, slowfast_file):
    """The tiny bundle's layout for GenzVQA: DIR/slowfast.safetensors and DIR/heads/genzvqa.*"""
    from diqa_cli.checkpoint import save_head
    from diqa_cli.models.genzvqa import GenzVQA

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = GenzVQA(tiny_backbone, **GenzVQA.tiny_config())
    save_head(model, tiny_dir / "heads" / "genzvqa.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    return tiny_dir


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, videos):
    folder = tmp_path_factory.mktemp("cli")
    damaged = encode(folder / "damaged.mp4", "libx264", count=12, options={"g": "3"}, noise=True,
                   container_options={"movflags": "faststart"})
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    damaged.write_bytes(bytes(data))
    audio = folder / "audio.m4a"
    import av

    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return [videos["h264"], str(audio), str(damaged)]



def video_args(bundle, fmt, *extra):
    return [
        "score-video", "--backbone", str(bundle / "backbone"),
        "--checkpoint", str(bundle / "heads" / "genzvqa.safetensors"),
        "--device", "cpu", "--dtype", "fp32", "--format", fmt, *extra,
    ]


def test_score_video_csv_one_row_per_video_exit_3(bundle, cli_inputs, run_main):
    args = ["--fps-sub", "10", "--max-frames", "12", "--max-clips", "1", "--batch-size", "12"]
    code, out, err = run_main([*video_args(bundle, "csv", *args), *cli_inputs])
    assert code == 3, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == (
        "path", "score", "raw_score", "status", "error",
        "frames_sampled", "frames_decoded", "frames_lost", "decoder", "duration",
    )
    assert [r["path"] for r in rows] == cli_inputs
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    good, audio, damaged = rows
    assert (good["frames_sampled"], good["frames_decoded"], good["frames_lost"]) == ("12", "12", "0")
    assert good["decoder"] == "decord" and float(good["duration"]) == pytest.approx(3.0)
    assert audio["error"] == "no video stream (only audio)" and audio["score"] == ""
    assert int(damaged["frames_lost"]) > 0 and damaged["decoder"] in ("pyav", "decord+pyav")
    assert int(damaged["frames_decoded"]) + int(damaged["frames_lost"]) == int(damaged["frames_sampled"]) == 12
    assert float(damaged["score"]) == float(damaged["raw_score"])
    assert f"diqa: {audio['path']}: no video stream" in err
    assert "did not decode; scored on the rest" in err and "1 of 3 videos failed" in err


def test_score_video_json_per_frame(bundle, videos, run_main):
    code, out, err = run_main([*video_args(bundle, "json", "--fps-sub", "2", "--per-frame"), videos["h264"]])
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["method"] == "genzvqa" and row["slowfast"].endswith("slowfast.safetensors")
    assert row["clips"] == 3 and row["frames_sampled"] == 6
    assert [round(f["time"], 3) for f in row["per_frame"]] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert np.mean([f["score"] for f in row["per_frame"]]) == pytest.approx(row["score"], rel=1e-5)
    # The same video through the library gives the same score (the CLI adds nothing).
    code, out_again, _ = run_main([*video_args(bundle, "jsonl", "--fps-sub", "2", "--decoder", "pyav"), videos["h264"]])
    assert json.loads(out_again)["score"] == pytest.approx(row["score"], rel=1e-4)


def test_score_video_per_frame_csv_is_long_and_the_db_reuses_frames_too(bundle, videos, run_main, tmp_path):
    db = str(tmp_path / "videos.sqlite")
    code, out, err = run_main([*video_args(bundle, "csv", "--fps-sub", "2", "--per-frame", "--db", db), videos["h264"]])
    assert code == 0, err
    lines = list(csv.DictReader(io.StringIO(out)))
    assert tuple(lines[0]) == ("path", "time", "score", "status", "error")
    assert [round(float(line["time"]), 3) for line in lines] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert {line["path"] for line in lines} == {videos["h264"]} and "reused 0 of 1" in err

    # Reused from the database: the same row, frame counts and per-frame scores included.
    code, out, err = run_main([*video_args(bundle, "jsonl", "--fps-sub", "2", "--per-frame", "--db", db), videos["h264"]])
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "reused 1 of 1" in err and row["cached"] is True
    assert [(round(f["time"], 3), f["score"]) for f in row["per_frame"]] == [
        (round(float(line["time"]), 3), float(line["score"])) for line in lines
    ]
    assert (row["frames_sampled"], row["frames_decoded"], row["decoder"]) == (6, 6, "decord")
    # Another frame choice gives another score: scored again.
    code, _, err = run_main([*video_args(bundle, "csv", "--fps-sub", "1", "--db", db), videos["h264"]])
    assert code == 0 and "reused 0 of 1" in err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--format", "table", "--per-frame"], "--per-frame"),
        (["--method", "genziqa"], "scores images"),
        (["--decoder", "ffmpeg"], "--decoder 'ffmpeg'"),
        (["--fps-sub", "0"], "--fps-sub"),
    ],
)
def test_score_video_usage_errors_exit_2(bundle, videos, run_main, extra, needle):
    code, out, err = run_main([*video_args(bundle, "csv"), *extra, videos["h264"]])
    assert code == 2 and needle in err and out == ""


def test_score_video_missing_slowfast_is_fatal_exit_1(bundle, videos, run_main, tmp_path):
    code, out, err = run_main([*video_args(bundle, "csv", "--slowfast", str(tmp_path / "none.safetensors")), videos["h264"]])
    assert code == 1 and "SlowFast weights" in err and out == ""


# --- decoding in decoder processes -----------------------------------------------------------------


def test_isolated_and_in_process_decoding_score_videos_identically(genzvqa, slowfast, videos, monkeypatch):
    from diqa_cli.pipelines.videos import score_videos

    def rows(isolation):
        monkeypatch.setenv("DIQA_DECODE_ISOLATION", isolation)
        return list(score_videos([videos["h264"], videos["vp9"]], genzvqa, slowfast, fps_sub=2, max_clips=2,
                                 per_frame=True, normalisation={"offset": 0.0, "scale": 1.0}))

    by_process, by_thread = rows("process"), rows("thread")
    keep = ("score", "raw_score", "status", "frames_sampled", "frames_decoded", "frames_lost", "decoder", "duration",
            "clips", "per_frame")
    assert [{k: r[k] for k in keep} for r in by_process] == [{k: r[k] for k in keep} for r in by_thread]
    assert [r["status"] for r in by_process] == ["ok", "ok"] and by_process[0]["clips"] == 2


def test_score_video_a_crashing_decoder_costs_one_row_and_the_run_goes_on(bundle, videos, run_main, tmp_path,
                                                                         monkeypatch):
    from diqa_cli import decodepool

    monkeypatch.setattr(decodepool, "_worker_prelude", (
        "import os, signal\nfrom diqa_cli import videoio\n_decode = videoio.decode_for_model\n"
        "def _crash(path, request, state):\n"
        "    if os.path.basename(path).startswith('segv'): os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    return _decode(path, request, state)\n"
        "videoio.decode_for_model = _crash\n"))
    crash = tmp_path / "segv.mp4"
    crash.write_bytes(open(videos["h264"], "rb").read())
    inputs = [videos["h264"], str(crash), videos["vp9"]]
    code, out, err = run_main([*video_args(bundle, "csv", "--max-frames", "2", "--max-clips", "1"), *inputs])
    assert code == 3, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["path"], r["status"], r["error"]) for r in rows] == [
        (videos["h264"], "ok", ""), (str(crash), "error", "decoder crashed (signal 11)"), (videos["vp9"], "ok", "")]
    assert f"diqa: {crash}: decoder crashed (signal 11)" in err and "1 of 3 videos failed" in err
