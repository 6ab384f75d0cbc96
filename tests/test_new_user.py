"""A new user's whole road, with no manual step: set DP-IQA up with one command (its released head,
backbone and CLIP served over a local HTTP server, as the manifest's hosts would serve them), score a
folder into a score database, select the best, and write a report.

The files are the tiny random bundle's in the published layouts (a pickled teacher state dict with
its frozen VAE, a diffusers folder, a CLIP folder): the numbers mean nothing, the road is real.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from test_weights import FileServer, run_cli, sha

BACKBONE_FILES = (
    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)
CLIP_FILES = ("config.json", "model.safetensors", "merges.txt", "vocab.json", "tokenizer_config.json", "tokenizer.json")


@pytest.fixture
def served(tiny_dir, tiny_backbone, tmp_path, monkeypatch):
    """The manifest entries DP-IQA needs, pointing at a local server holding the tiny bundle's files."""
    from diqa_cli.models.dpiqa import DPIQA

    server = FileServer()
    monkeypatch.setenv("DIQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIQA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # The released teacher: the class's own (released) configuration, as its authors saved it.
    teacher = DPIQA(tiny_backbone, clip=str(tiny_dir / "clip"))
    released = {**teacher.checkpoint_state_dict(), **{f"vae.{k}": v for k, v in tiny_backbone.vae.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(released, buffer)
    server.files["/drive/dpiqa_koniq.pth"] = buffer.getvalue()

    def folder(name, root, files):
        entries = []
        for rel in files:
            body = (root / rel).read_bytes()
            server.files[f"/{name}/{rel}"] = body
            fmt = "json" if rel.endswith(".json") else "txt" if rel.endswith(".txt") else "safetensors"
            entries.append({"path": rel, "format": fmt, "sha256": sha(body), "size": len(body)})
        return entries

    manifest = {
        "format": "diqa-weights-manifest/1",
        "entries": {
            "dpiqa-koniq": {
                "name": "dpiqa-koniq", "kind": "head", "description": "DP-IQA teacher (test copy)",
                "licence": "CC BY-NC-SA 4.0 (non-commercial use only)", "non_commercial": True, "method": "dpiqa",
                "source": server.url + "/drive",
                "files": [{"path": "dpiqa_koniq.pth", "format": "pickle", "sha256": None, "sha256_note": "test"}],
            },
            "sd15": {"name": "sd15", "kind": "diffusers-backbone", "description": "tiny stand-in", "licence": "test",
                     "source": server.url + "/sd15", "files": folder("sd15", tiny_dir / "backbone", BACKBONE_FILES)},
            "clip-vit-large-patch14": {"name": "clip-vit-large-patch14", "kind": "text-encoder", "description": "tiny stand-in",
                                       "licence": "test", "source": server.url + "/clip",
                                       "files": folder("clip", tiny_dir / "clip", CLIP_FILES)},
        },
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv("DIQA_MANIFEST", str(path))
    yield server
    server.close()


def test_setup_score_filter_report(served, tiny_images, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(tiny_images(5, 80)):
        image.save(photos / f"p{i}.png")
    (photos / "broken.png").write_bytes(b"not an image")

    # Before setup: one message naming every missing piece and the command.
    code, _, err = run_cli(["score", str(photos), "--offline"], monkeypatch, capsys)
    assert code == 1 and "diqa weights pull --for dpiqa" in err and served.requests == 0
    for name in ("DIQA_OFFLINE", "HF_HUB_OFFLINE"):  # --offline binds this process; the next command is a new one
        monkeypatch.delenv(name, raising=False)

    code, _, err = run_cli(["weights", "pull", "--for", "dpiqa", "--accept-licence"], monkeypatch, capsys)
    assert code == 0, err
    assert "dpiqa is ready" in err and "dropped" in err  # the released pickle converted, its drops said

    db = tmp_path / "scores.sqlite"
    code, out, err = run_cli(["score", str(photos), "--db", str(db), "-f", "csv"], monkeypatch, capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 3 and len(rows) == 6  # the broken file: an error row, the run goes on
    scored = sorted((float(r["score"]), r["path"]) for r in rows if r["status"] == "ok")
    assert len(scored) == 5

    threshold = scored[2][0]
    code, out, _ = run_cli(["filter", str(db), "-m", "dpiqa", "--min-score", repr(threshold)], monkeypatch, capsys)
    assert code == 0 and out.splitlines() == [path for _, path in sorted(scored, reverse=True)[:3]]

    report = tmp_path / "report.html"
    code, _, err = run_cli(["report", str(db), "-o", str(report)], monkeypatch, capsys)
    assert code == 0, err
    page = report.read_text(encoding="utf-8")
    assert all(path in page for _, path in scored) and "broken.png" in page
