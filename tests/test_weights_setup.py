"""`diqa weights pull --for METHOD`: one command sets a method up, end to end against a local HTTP
server; and a score without its weights names every missing piece and that command."""

from __future__ import annotations

import io

import pytest
import torch

from diqa_cli import methods
from diqa_cli.methods import MethodSpec, WeightsPart, register_method
from test_weights import run_cli, server, sha, url_entry, write_manifest  # noqa: F401 - server: fixture



@pytest.fixture
def toy_method():
    """A method whose parts come from three entries: a non-commercial pickle head, two parts of a
    backbone folder (its third part is not needed), and a whole extra entry."""
    spec = register_method(MethodSpec(
        name="toy-setup", summary="test", paper="none", model="diqa_cli.models.dpiqa:DPIQA", default_backbone="toy-backbone",
        released_weights=("toy-head",),
        weights=(
            WeightsPart("toy-head", purpose="released head", role="head"),
            WeightsPart("toy-backbone", ("unet", "model_index.json"), purpose="backbone", role="backbone"),
            WeightsPart("toy-extra", purpose="extra features"),
        ),
    ))
    yield spec
    methods._REGISTRY.pop(spec.name, None)


@pytest.fixture
def served(server, tmp_path, monkeypatch, toy_method):
    monkeypatch.setenv("DIQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIQA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    buffer = io.BytesIO()
    torch.save({"head.weight": torch.ones(3)}, buffer)
    files = {
        "/head/head.pth": buffer.getvalue(),
        "/bb/unet/w.safetensors": b"unet weights" * 10,
        "/bb/vae/w.safetensors": b"vae weights, not needed",
        "/bb/model_index.json": b"{}",
        "/extra/x.bin.txt": b"extra",
    }
    server.files.update(files)

    def pinned(path, served_path, fmt="safetensors"):
        return {"path": path, "format": fmt, "sha256": sha(files[served_path]), "size": len(files[served_path])}

    write_manifest(tmp_path, monkeypatch, {
        "toy-head": url_entry(server, [{"path": "head.pth", "format": "pickle", "sha256": None,
                                        "sha256_note": "test: recorded on first use", "url": server.url + "/head/head.pth"}],
                              licence="CC BY-NC-SA 4.0 (non-commercial use only)", non_commercial=True),
        "toy-backbone": {**url_entry(server, [pinned("unet/w.safetensors", "/bb/unet/w.safetensors"),
                                              pinned("vae/w.safetensors", "/bb/vae/w.safetensors"),
                                              pinned("model_index.json", "/bb/model_index.json", "json")]),
                         "kind": "diffusers-backbone", "source": server.url + "/bb"},
        "toy-extra": {**url_entry(server, [pinned("x.bin.txt", "/extra/x.bin.txt", "txt")]), "source": server.url + "/extra"},
    })
    return server


def test_pull_for_a_method_lists_then_fetches_converts_and_verifies(served, monkeypatch, capsys):
    from diqa_cli import weights

    code, out, err = run_cli(["weights", "pull", "--for", "toy-setup", "--accept-licence"], monkeypatch, capsys)
    assert code == 0, err
    listing = err.split("\n")
    assert listing[0] == "diqa: toy-setup needs:"
    assert any("toy-head" in line and "non-commercial" in line and "released head" in line for line in listing)
    assert any("toy-backbone (unet, model_index.json)" in line and "122 B" in line for line in listing)
    assert "toy-setup is ready" in err
    head = weights.entry("toy-head").local_dir
    assert (head / "head.safetensors").is_file()  # the pickle converted (weights_only=True)
    backbone = weights.entry("toy-backbone").local_dir
    assert (backbone / "unet" / "w.safetensors").is_file() and not (backbone / "vae").exists()  # only the parts read
    statuses = {(r.name, r.path): r.status for r in weights.verify()}
    assert statuses[("toy-backbone", "unet/w.safetensors")] == "ok"
    assert statuses[("toy-backbone", "vae/w.safetensors")] == "not-pulled"  # a part no method reads
    assert statuses[("toy-head", "head.safetensors")] == "ok"  # the conversion's recorded hash
    assert all(r.ok for r in weights.verify())

    # Once set up, nothing more is fetched, and a score would find every piece.
    requests = served.requests
    assert run_cli(["weights", "pull", "--for", "toy-setup", "--accept-licence"], monkeypatch, capsys)[0] == 0
    assert served.requests == requests
    from diqa_cli.weights.setup import missing_for

    assert missing_for(methods.get_method("toy-setup")) == []


def test_non_commercial_weights_are_never_accepted_silently_in_a_pipe(served, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    code, _, err = run_cli(["weights", "pull", "--for", "toy-setup"], monkeypatch, capsys)
    assert code == 1
    assert "toy-head is licensed for non-commercial use only" in err and "--accept-licence" in err
    assert served.requests == 0


def test_print_urls_names_every_file_and_downloads_nothing(served, monkeypatch, capsys):
    code, out, _ = run_cli(["weights", "pull", "--for", "toy-setup", "--print-urls"], monkeypatch, capsys)
    assert code == 0 and served.requests == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0].rsplit("/", 1)[-1] for r in rows] == ["head.pth", "w.safetensors", "model_index.json", "x.bin.txt"]
    assert rows[0][2] == "-" and rows[1][2] == sha(b"unet weights" * 10)
    assert rows[1][1].endswith("toy-backbone/unet/w.safetensors")


def test_a_score_without_its_weights_lists_every_missing_piece_and_the_command(served, monkeypatch):
    from diqa_cli.errors import WeightsError
    from diqa_cli.scoring import load_scorer

    with pytest.raises(WeightsError) as info:
        load_scorer("toy-setup", offline=True)
    message = str(info.value)
    for piece in ("toy-head", "toy-backbone (unet, model_index.json)", "toy-extra"):
        assert piece in message
    assert message.endswith("`diqa weights pull --for toy-setup`")
    assert served.requests == 0


def test_verify_never_creates_trust(served, monkeypatch, capsys):
    """A file nobody recorded a hash for (copied into the cache by hand) is unverified, and stays so."""
    from diqa_cli import weights

    folder = weights.entry("toy-head").local_dir
    folder.mkdir(parents=True)
    (folder / "head.pth").write_bytes(served.files["/head/head.pth"])
    for _ in range(2):
        code, out, err = run_cli(["weights", "verify", "toy-head"], monkeypatch, capsys)
        assert code == 1
        assert out.startswith("unverified\ttoy-head/head.pth") and "no hash to compare with" in err
