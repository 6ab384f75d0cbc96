"""`diqa score` and `diqa methods` as a shell pipeline sees them, and the scoring pipeline.

The end-to-end tests run the real `dpiqa` method on the tiny bundle (`diqa_cli.tiny`) in a
subprocess, stdout piped and stderr separate, as `diqa score ... | consumer` would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diqa_cli.pipelines.images import score_images
from test_checkpoint import LatentConv, latent_conv_method  # noqa: F401 - fixture

DIQA = [str(Path(sys.executable).with_name("diqa"))]  # the installed console script


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(tiny_dir, dpiqa_head):
    """The tiny bundle's layout (`diqa weights tiny`, :func:`diqa_cli.tiny.write_tiny_bundle`) with
    its DP-IQA head only; the other methods' heads cost more to build than these tests' own work."""
    return tiny_dir


@pytest.fixture(scope="session")
def cli_env(bundle, model_home):
    """Environment of the CLI subprocesses: offline, the session home (where building the head
    cached its prompt embeddings), nothing inherited that could turn on colour or claim a terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TERM", "COLUMNS")}
    env.update(DIQA_HOME=model_home, HF_HUB_OFFLINE="1", DIQA_OFFLINE="1")
    return env


@pytest.fixture(scope="session")
def inputs(tiny_images, tmp_path_factory):
    """good1, corrupt, good2, truncated, missing, good3: one row each, in this order."""
    folder = tmp_path_factory.mktemp("inputs")
    good = []
    for i, image in enumerate(tiny_images(3)):
        path = folder / f"good{i + 1}.png"
        image.save(path)
        good.append(path)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image\n" * 10)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    missing = folder / "missing.png"
    order = [good[0], corrupt, good[1], truncated, missing, good[2]]
    return [str(p) for p in order]


def head_args(bundle, fmt):
    return [
        "score",
        "--backbone", str(bundle / "backbone"),
        "--checkpoint", str(bundle / "heads" / "dpiqa.safetensors"),
        "--device", "cpu",
        "--dtype", "fp32",
        "--format", fmt,
    ]


def run_cli(args, env, **kwargs):
    return subprocess.run([*DIQA, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)



# --- end to end, in a subprocess -----------------------------------------------------------------


def test_csv_on_stdout_one_row_per_input_in_order_exit_3(bundle, cli_env, inputs):
    result = run_cli([*head_args(bundle, "csv"), *inputs], cli_env)
    assert result.returncode == 3, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == ("path", "score", "raw_score", "status", "error")
    assert [r["path"] for r in rows] == inputs  # every input once, in input order, no log lines
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error", "error", "ok"]
    for row in rows:
        if row["status"] == "ok":
            assert float(row["score"]) == float(row["raw_score"])  # the tiny heads' identity normalisation
            assert row["error"] == ""
        else:
            assert row["score"] == "" and row["error"]
            assert f"diqa: {row['path']}: {row['error']}" in result.stderr
    assert "no such file" in rows[4]["error"]
    assert "━" not in result.stderr  # no progress bar when stderr is not a terminal


def test_json_and_jsonl_carry_the_run_and_agree_across_batch_sizes(bundle, model_home, inputs, run_main):
    good = [inputs[0], inputs[2], inputs[5]]
    code, out, _ = run_main([*head_args(bundle, "json"), "--batch-size", "1", *good], home=model_home)
    assert code == 0
    rows = json.loads(out)
    assert [r["path"] for r in rows] == good
    checkpoint = str(bundle / "heads" / "dpiqa.safetensors")
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        assert row["method"] == "dpiqa" and row["backbone"] == str(bundle / "backbone")
        assert row["checkpoint"] == checkpoint and row["seconds"] >= 0

    # One batch of three instead of three of one: the same scores, one JSON object per line.
    code, out, _ = run_main([*head_args(bundle, "jsonl"), "--batch-size", "4", *good], home=model_home)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in lines] == good
    assert [r["score"] for r in lines] == pytest.approx([r["score"] for r in rows], abs=1e-5)
    assert len({r["score"] for r in lines}) == 3  # distinct images, distinct scores


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_stderr(bundle, model_home, inputs, run_main, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = run_main([*head_args(bundle, "csv"), inputs[0], inputs[4]], home=model_home)
    assert code == 3
    assert [r["status"] for r in csv.DictReader(io.StringIO(out))] == ["ok", "error"]
    assert "━" not in out and "scoring" not in out
    shown = terminal.getvalue()
    assert "scoring" in shown and "2/2" in shown  # the bar, on stderr
    assert f"diqa: {inputs[4]}: no such file" in shown


def test_head_closing_the_pipe_early_leaves_no_traceback(bundle, cli_env, tmp_path):
    # Far more output than a pipe buffer holds, so diqa is still writing when the reader leaves.
    listing = tmp_path / "paths.txt"
    listing.write_text("".join(f"{tmp_path}/absent-{i:05d}.png\n" for i in range(3000)))
    with open(listing) as stdin, open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(
            [*DIQA, *head_args(bundle, "csv"), "-"], stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, env=cli_env
        )
        first = proc.stdout.readline()
        proc.stdout.close()  # what `| head -1` does after its line
        code = proc.wait(timeout=300)
        stderr.seek(0)
        err = stderr.read()
    assert first.startswith(b"path,score")
    assert "Traceback" not in err and "Exception ignored" not in err
    assert code == 141


def test_ctrl_c_keeps_written_rows_and_closes_the_json_array(bundle, cli_env, inputs, tmp_path):
    # A FIFO input blocks its decoder, so the run is reliably mid-way when Ctrl-C arrives; the
    # missing file before it has its (error) row written by then.
    fifo = tmp_path / "stalled.png"
    os.mkfifo(fifo)
    args = [*head_args(bundle, "json"), inputs[4], str(fifo), inputs[2]]
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        # Ctrl-C at a terminal: SIGINT at its default disposition. A shell starts background jobs
        # (`make test &`) with SIGINT ignored, and children rightly inherit that.
        proc = subprocess.Popen(
            [*DIQA, *args], stdout=subprocess.PIPE, stderr=stderr, env=cli_env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        written = b""
        while b"}" not in written:  # the first row, complete before the stalled input
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, "diqa ended before writing a row"
            written += chunk
        proc.send_signal(signal.SIGINT)
        try:  # let a decoder stalled on the pipe finish (a decoder process is killed instead)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is reading it any more
            pass
        written += proc.stdout.read()
        code = proc.wait(timeout=60)
        stderr.seek(0)
        err = stderr.read()
    rows = json.loads(written)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, (code, err)
    assert [(r["path"], r["status"]) for r in rows] == [(inputs[4], "error")]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["score", "x.png", "--method", "dpiq"], "did you mean 'dpiqa'"),
        (["score", "x.png", "--format", "xml"], "--format 'xml'"),
        (["score", "x.png", "--batch-size", "0"], "batch-size"),
        (["score"], "no inputs"),
    ],
)
def test_usage_errors_exit_2_with_the_fix(args, needle, run_main):
    code, out, err = run_main(args)
    assert code == 2
    assert needle in err and out == ""


def test_video_methods_are_pointed_to_score_video(run_main):
    from diqa_cli.methods import list_methods

    videos = list_methods("video")
    if not videos:
        pytest.skip("no video method registered")
    code, out, err = run_main(["score", "x.png", "--method", videos[0].name])
    assert code == 2 and "diqa score-video" in err and out == ""


def test_missing_checkpoint_is_fatal_exit_1(inputs, tmp_path, run_main):
    code, out, err = run_main(["score", inputs[0], "--checkpoint", str(tmp_path / "none.safetensors")])
    assert code == 1
    assert "none.safetensors" in err and "does not exist" in err and out == ""


def test_checkpoint_without_sidecar_is_fatal_exit_1(bundle, inputs, tmp_path, run_main):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((bundle / "heads" / "dpiqa.safetensors").read_bytes())
    code, out, err = run_main(["score", inputs[0], "--checkpoint", str(lone)])
    assert code == 1 and "no sidecar lone.json" in err and out == ""


def test_released_weights_missing_offline_is_fatal_exit_1_naming_them(inputs, run_main):
    code, out, err = run_main(["score", inputs[0], "--method", "dpiqa", "--offline"])
    assert code == 1 and out == ""
    assert "dpiqa-koniq" in err


def test_method_without_released_weights_says_how_to_get_a_head(inputs, run_main):
    from diqa_cli.methods import list_methods

    unreleased = next((s.name for s in list_methods("image") if not s.released_weights), None)
    if unreleased is None:
        pytest.skip("every registered image method has released weights")
    code, _, err = run_main(["score", inputs[0], "--method", unreleased])
    assert code == 1  # weights missing, as the README's exit-code table says
    assert "no published head" in err and "diqa train" in err and "-c " in err


def test_listing_and_help_never_import_torch(cli_env):
    probe = (
        "import sys\n"
        "from diqa_cli.cli import main\n"
        "for args in (['--help'], ['methods'], ['methods', '--format', 'json'], ['score', '--help']):\n"
        "    sys.argv = ['diqa', *args]\n"
        "    try:\n        main()\n    except SystemExit as exc:\n        code = exc.code\n"
        "    heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'matplotlib') if m in sys.modules)\n"
        "    print('RESULT', args, code, heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=cli_env, capture_output=True, text=True, timeout=60)
    results = [line for line in result.stderr.splitlines() if line.startswith("RESULT")]
    assert len(results) == 4, result.stderr
    assert all(line.endswith("0 []") for line in results), results


def test_methods_lists_the_registry(cli_env):
    from diqa_cli.methods import list_methods

    listed = json.loads(run_cli(["methods", "--format", "json"], cli_env).stdout)
    assert [m["name"] for m in listed] == [s.name for s in list_methods()]
    dpiqa = next(m for m in listed if m["name"] == "dpiqa")
    for key in ("aliases", "input_kind", "default_backbone", "timesteps", "score_direction", "score_range",
                "licence", "paper"):
        assert key in dpiqa
    table = run_cli(["methods"], cli_env).stdout
    assert "dpiqa" in table and "CC BY-NC-SA 4.0" in table and "higher is better" in table


# --- in process: the pipeline --------------------------------------------------------------------


def test_pipeline_rows_in_order_with_normalisation(latent_conv_method, tiny_backbone, inputs):
    model = LatentConv(tiny_backbone)
    seen = []
    rows = list(score_images(
        inputs, model, batch_size=2, workers=2, normalisation={"offset": 1.0, "scale": -2.0}, progress=seen.append
    ))
    assert seen == rows
    assert [r["path"] for r in rows] == inputs
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error", "error", "ok"]
    for row in rows:
        if row["status"] == "ok":
            assert row["score"] == pytest.approx(row["raw_score"] * -2.0 + 1.0)
            assert row["method"] == "test-latent-conv" and row["backbone"] == tiny_backbone.ref


def test_rows_stream_before_the_input_is_exhausted(latent_conv_method, tiny_backbone, inputs):
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield inputs[0] if i % 2 else inputs[4]  # good and missing, alternating

    model = LatentConv(tiny_backbone)
    first = next(score_images(items(), model, batch_size=2, workers=1, normalisation={"offset": 0, "scale": 1}))
    assert first["status"] == "error" and len(consumed) < 40


class FailsOnWhite(LatentConv):
    """Fails any batch holding a white image, as a CUDA OOM or a bad input would."""

    def forward(self, pixels):
        if (pixels.flatten(1).mean(1) > 0.99).any():
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        return super().forward(pixels)


def test_failing_batch_is_retried_one_image_at_a_time(latent_conv_method, tiny_backbone, inputs, tmp_path):
    from PIL import Image

    white = tmp_path / "white.png"
    Image.new("RGB", (64, 64), "white").save(white)
    paths = [inputs[0], str(white), inputs[2], inputs[5]]
    model = FailsOnWhite(tiny_backbone)
    rows = list(score_images(paths, model, batch_size=4, workers=1, normalisation={"offset": 0, "scale": 1}))
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]
    assert rows[1]["error"] == "scoring failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    alone = list(score_images([inputs[0]], model, batch_size=1, workers=1, normalisation={"offset": 0, "scale": 1}))
    assert rows[0]["raw_score"] == pytest.approx(alone[0]["raw_score"], abs=1e-5)


def test_pixel_limit_and_non_finite_scores_give_error_rows(latent_conv_method, tiny_backbone, inputs):
    class ReturnsNaN(LatentConv):
        def forward(self, pixels):
            return super().forward(pixels) * float("nan")

    capped = list(score_images([inputs[0]], LatentConv(tiny_backbone), workers=1, max_pixels=100,
                               normalisation={"offset": 0, "scale": 1}))
    assert capped[0]["status"] == "error" and "too many pixels" in capped[0]["error"]
    nan = list(score_images([inputs[0]], ReturnsNaN(tiny_backbone), workers=1, normalisation={"offset": 0, "scale": 1}))
    assert nan[0]["status"] == "error" and nan[0]["score"] is None and "non-finite" in nan[0]["error"]


def test_bare_state_dict_is_read_with_the_named_methods_released_config(latent_conv_method, tiny_dir, tiny_backbone,
                                                                        tiny_pixels, tmp_path):
    from safetensors.torch import save_file

    from diqa_cli.errors import WeightsError
    from diqa_cli.scoring import load_scorer

    released = LatentConv(tiny_backbone)  # the class defaults stand for the released architecture
    bare = tmp_path / "converted.safetensors"
    save_file(released.checkpoint_state_dict(), str(bare))
    with pytest.raises(WeightsError, match="no sidecar"):
        load_scorer(None, checkpoint=str(bare), backbone=str(tiny_dir / "backbone"), device="cpu", dtype="fp32")
    model, sidecar = load_scorer(
        latent_conv_method, checkpoint=str(bare), backbone=str(tiny_dir / "backbone"), device="cpu", dtype="fp32"
    )
    assert sidecar["weights"] == "converted.safetensors" and sidecar["score_normalisation"]["scale"] == 1.0
    with torch.no_grad():
        assert torch.equal(model(tiny_pixels(2)), released(tiny_pixels(2)))
