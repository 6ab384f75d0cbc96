"""``diqa train``, ``diqa distill``, ``diqa eval`` and ``diqa demo``: parse, call the library, format.

Data (the saved checkpoint's path, the metrics, the demo's table) goes to stdout; progress and
notes go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from diqa_cli.errors import UsageError
from diqa_cli.home import offline_requested

_DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"
_DTYPE_HELP = "auto | fp32 | fp16 | bf16 (half precision trains under autocast, parameters in fp32)"
_CONFIG_HELP = "the model's config: a JSON object, a JSON file, or 'tiny' for the method's tiny-backbone head"
_DATA_HELP = "labels CSV (path,mos[,split]), a published label file (see --preset) or a dataset folder holding one"
_PRESET_HELP = "koniq10k | clive | spaq | kadid10k | konvid1k | livevqc: read that dataset's published label file (recognised by name without this)"
_PATH_COL_HELP = "column of the image/video paths (default: path; case is ignored)"
_MOS_COL_HELP = "column of the MOS (default: mos; case is ignored)"
_SPLIT_COL_HELP = "column of the split, train/val/test (default: split, when present)"
_MEDIA_DIR_HELP = "folder the paths are relative to (default: the labels file's; a preset's image/video folder beside it)"


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _parse_config(text: Optional[str]):
    if text is None or text == "tiny":
        return text
    source = Path(text)
    raw = source.read_text(encoding="utf-8") if source.is_file() else text
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {text!r} is neither 'tiny', a JSON object nor a JSON file ({exc.msg})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config must be a JSON object, got {type(config).__name__}")
    return config


def _labels(data: Path, preset, path_col, mos_col, split_col, media_dir):
    """The labels source the library reads; says on stderr which preset a file was recognised as."""
    from diqa_cli.training import labels_source

    source = labels_source(data, preset=preset, path_col=path_col, mos_col=mos_col, split_col=split_col, media_dir=media_dir)
    if source.detected:
        p = source.preset
        _log(f"diqa: {source.path.name} is {p.title}'s published label file: reading it with --preset {p.name} ({p.note})")
    return source


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        method: str = typer.Option(..., "--method", "-m", help="registered method name (see `diqa methods`)"),
        data: Path = typer.Option(..., "--data", help=_DATA_HELP + "; trains on split 'train' when present"),
        out: Path = typer.Option(..., "--out", "-o", help="head checkpoint to write (.safetensors; the sidecar goes beside it)"),
        preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP),
        path_col: Optional[str] = typer.Option(None, "--path-col", help=_PATH_COL_HELP),
        mos_col: Optional[str] = typer.Option(None, "--mos-col", help=_MOS_COL_HELP),
        split_col: Optional[str] = typer.Option(None, "--split-col", help=_SPLIT_COL_HELP),
        media_dir: Optional[Path] = typer.Option(None, "--media-dir", help=_MEDIA_DIR_HELP),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="manifest name, diffusers folder or .safetensors (default: the method's)"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="default: the method's released setting"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default: the method's released setting"),
        lr: Optional[float] = typer.Option(None, "--lr", help="default: the method's released setting"),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: the method's)"),
        grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="gradient-norm clip, 0 for none (default: the method's)"),
        seed: int = typer.Option(0, "--seed", help="seeds initialisation, batch order and noise; recorded in the sidecar"),
        config: Optional[str] = typer.Option(None, "--config", help=_CONFIG_HELP),
        init: Optional[str] = typer.Option(None, "--init", help="start from this head checkpoint (same method; for genzvqa, a genziqa head), or 'imagenet' (a method whose model starts from ImageNet weights, taken from the weights manifest)"),
        slowfast: Optional[str] = typer.Option(None, "--slowfast", help="video methods: SlowFast weights (default: the config's)"),
        device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
        workers: int = typer.Option(2, "--workers", help="image-decoding threads"),
        eval_every: int = typer.Option(
            1, "--eval-every", min=0,
            help="score the held-out rows (split val, else test) every N epochs and log their SRCC; 0 never",
        ),
        keep_last: bool = typer.Option(
            False, "--keep-last", help="save the last epoch's head even when a val split found a better one"
        ),
        offline: bool = typer.Option(False, "--offline", help="never touch the network"),
    ) -> None:
        """Train a quality head on a labels CSV (images, or videos for genzvqa) and save it with its sidecar.

        Each epoch logs its loss and, when the labels have a val or test split, the held-out SRCC;
        with a val split the best epoch's head is saved (never selected on test)."""
        from diqa_cli.training import train

        train(
            method,
            _labels(data, preset, path_col, mos_col, split_col, media_dir),
            backbone=backbone,
            out=out,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            seed=seed,
            config=_parse_config(config),
            device=device,
            dtype=dtype,
            init_checkpoint=init,
            clip_encoder=slowfast,
            offline=offline_requested(offline),
            workers=workers,
            eval_every=eval_every,
            keep_last=keep_last,
            log=_log,
        )
        typer.echo(str(out))

    @app.command("distill")
    def distill_command(
        teacher: Path = typer.Option(..., "--teacher", help="DP-IQA teacher head checkpoint"),
        data: Path = typer.Option(..., "--data", help=_DATA_HELP + "; uses split 'train' when present"),
        out: Path = typer.Option(..., "--out", "-o", help="student head checkpoint to write (.safetensors)"),
        preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP),
        path_col: Optional[str] = typer.Option(None, "--path-col", help=_PATH_COL_HELP),
        mos_col: Optional[str] = typer.Option(None, "--mos-col", help=_MOS_COL_HELP),
        split_col: Optional[str] = typer.Option(None, "--split-col", help=_SPLIT_COL_HELP),
        media_dir: Optional[Path] = typer.Option(None, "--media-dir", help=_MEDIA_DIR_HELP),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="default: the released 30"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default: the released 24"),
        lr: Optional[float] = typer.Option(None, "--lr", help="default: the released 1e-4"),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0, as Adam)"),
        seed: int = typer.Option(0, "--seed", help="seeds initialisation and batch order; recorded in the sidecar"),
        config: Optional[str] = typer.Option(None, "--config", help=_CONFIG_HELP),
        device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
        workers: int = typer.Option(2, "--workers", help="image-decoding threads"),
        offline: bool = typer.Option(False, "--offline", help="never touch the network"),
    ) -> None:
        """Distil a DP-IQA teacher into its EfficientNet student (score MSE + feature-map MSE)."""
        from diqa_cli.training import distill

        distill(
            teacher,
            _labels(data, preset, path_col, mos_col, split_col, media_dir),
            out=out,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            config=_parse_config(config),
            device=device,
            dtype=dtype,
            offline=offline_requested(offline),
            workers=workers,
            log=_log,
        )
        typer.echo(str(out))

    @app.command("eval")
    def eval_command(
        checkpoint: Path = typer.Option(..., "--checkpoint", help="head checkpoint (.safetensors with its sidecar)"),
        data: Path = typer.Option(..., "--data", help=_DATA_HELP),
        preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP),
        path_col: Optional[str] = typer.Option(None, "--path-col", help=_PATH_COL_HELP),
        mos_col: Optional[str] = typer.Option(None, "--mos-col", help=_MOS_COL_HELP),
        split_col: Optional[str] = typer.Option(None, "--split-col", help=_SPLIT_COL_HELP),
        media_dir: Optional[Path] = typer.Option(None, "--media-dir", help=_MEDIA_DIR_HELP),
        split: Optional[str] = typer.Option(None, "--split", help="rows to use: default 'test' when the CSV has a split column; 'all' for every row"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="replace the backbone the sidecar names"),
        slowfast: Optional[str] = typer.Option(None, "--slowfast", help="video methods: replace the SlowFast weights the sidecar names"),
        batch_size: int = typer.Option(8, "--batch-size"),
        workers: int = typer.Option(2, "--workers", help="image-decoding threads"),
        device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=_DTYPE_HELP),
        fmt: str = typer.Option("table", "--format", "-f", help="table | json"),
        offline: bool = typer.Option(False, "--offline", help="never touch the network"),
        predictions: Optional[Path] = typer.Option(
            None, "--predictions", help="also write a CSV with each input's path, MOS, score, status and error"
        ),
        plot: Optional[Path] = typer.Option(None, "--plot", help="also write a PNG: predicted score against MOS with the 4-parameter logistic fit, SRCC and PLCC (needs matplotlib: pip install 'diqa-cli[plots]')"),
    ) -> None:
        """Score a labelled set and print SRCC, PLCC (raw, and after the 4-parameter logistic fit) and KRCC."""
        fmt = fmt.lower()
        if fmt not in ("table", "json"):
            raise UsageError(f"unknown --format {fmt!r} for eval; choose table or json")
        if plot is not None:
            from diqa_cli.plots import require_matplotlib

            require_matplotlib("--plot")  # before any scoring
            if plot.is_dir():
                raise UsageError(f"--plot {str(plot)!r} is a directory; name a .png file")
        from diqa_cli.training import evaluate

        result = evaluate(
            checkpoint,
            _labels(data, preset, path_col, mos_col, split_col, media_dir),
            split=split,
            backbone=backbone,
            clip_encoder=slowfast,
            batch_size=batch_size,
            workers=workers,
            device=device,
            dtype=dtype,
            offline=offline_requested(offline),
            log=_log,
            keep_scores=plot is not None,
            predictions=predictions,
        )
        _log(f"diqa: {result['method']} head on split {result['split']!r} of {data}")
        if plot is not None:
            from diqa_cli.plots import eval_plot

            predicted, target = result.pop("predicted"), result.pop("target")
            fit = eval_plot(plot, predicted, target, label=f"{result['method']} on split {result['split']} of {data.name}")
            fitted = f"{fit['plcc_fitted']:.4f}" if fit["plcc_fitted"] is not None else "no fit"
            _log(f"diqa: wrote {plot} (PLCC after the logistic fit: {fitted})")
        if fmt == "json":
            typer.echo(json.dumps(result))
        else:
            for key in ("srcc", "plcc", "plcc_logistic", "krcc", "n", "n_failed"):
                value = result[key]
                typer.echo(f"{key:<14}{value:.4f}" if isinstance(value, float) else f"{key:<14}{value}")

    @app.command("demo")
    def demo_command(
        out: Optional[Path] = typer.Option(None, "--out", help="folder for the synthetic set and the head (kept); default: a temporary folder under DIQA_HOME"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="training epochs (default tuned to finish in a few minutes on 2 CPU cores)"),
        keep: bool = typer.Option(False, "--keep", help="keep the temporary folder"),
    ) -> None:
        """Tiny random-backbone demo on a synthetic distortion set: train, score, SRCC. Not a quality model."""
        from diqa_cli.demo import run_demo

        run_demo(out, epochs=epochs, keep=keep, log=_log)
