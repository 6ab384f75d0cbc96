"""Weights manifest, cache, pull / resolve / verify, offline mode and convert.

Downloads go to a small HTTP server on 127.0.0.1 run inside the test; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from diqa_cli import weights
from diqa_cli.errors import UsageError, WeightsError

GOOD = b"tiny weights file\n" * 64
TAMPERED = b"tiny weights file, but not the one the manifest pins\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """Serves ``files`` (path -> bytes) and counts every request it receives."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private DIQA_HOME with network access allowed (conftest switches offline on)."""
    monkeypatch.setenv("DIQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIQA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


def write_manifest(tmp_path, monkeypatch, entries: dict) -> Path:
    path = tmp_path / "manifest.json"
    body = {"format": "diqa-weights-manifest/1", "entries": {k: {"name": k, **v} for k, v in entries.items()}}
    path.write_text(json.dumps(body))
    monkeypatch.setenv("DIQA_MANIFEST", str(path))
    return path


def url_entry(server: FileServer, files: list[dict], **extra) -> dict:
    return {
        "kind": "head",
        "description": "test entry",
        "licence": "test",
        "source": server.url,
        "files": files,
        **extra,
    }


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from diqa_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["diqa", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------ the manifest


def test_shipped_manifest_entries_are_well_formed():
    entries = weights.load_manifest(weights.manifest_path())
    expected = {
        "sd15", "sd21-base", "clip-vit-large-patch14", "dpiqa-koniq", "dpiqa-student-koniq",
        "lpips-v0.1", "alexnet-imagenet", "vgg16-imagenet", "efficientnet-b7-imagenet",
        "slowfast-r50-k400",
    }
    assert expected <= set(entries)
    for e in entries.values():
        assert e.kind in weights.KINDS and e.licence.strip() and e.description.strip()
        if e.source.startswith("hf://"):
            assert e.revision
        for f in e.files:
            assert f.format in weights.FORMATS
            if f.sha256 is None:
                assert f.sha256_note, f"{e.name}/{f.path} has no hash and no note saying why"
            else:
                assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
                if f.sha256_prefix:
                    assert f.sha256.startswith(f.sha256_prefix)
    for name in ("dpiqa-koniq", "dpiqa-student-koniq"):
        e = entries[name]
        assert e.non_commercial and "non-commercial" in e.licence.lower()
        assert "NC" in e.licence and "NON-COMMERCIAL" in e.description
        assert e.files[0].format == "pickle" and e.method
    # a diffusers backbone entry carries every part a diffusers folder needs
    sd15 = {f.path for f in entries["sd15"].files}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/config.json", "model_index.json",
            "text_encoder/model.safetensors", "tokenizer/vocab.json",
            "scheduler/scheduler_config.json"} <= sd15


def test_shipped_lpips_hashes_match_the_installed_package(home):
    """The LPIPS hashes in the manifest are the real ones: pulling from the package passes them."""
    path = weights.pull("lpips-v0.1", allow_pickle=True)
    assert path == home / "weights" / "lpips-v0.1"
    e = weights.entry("lpips-v0.1")
    for f in e.files:
        assert weights.sha256_file(path / f.path) == f.sha256


def test_malformed_manifest_is_refused_with_the_reason(tmp_path, monkeypatch, server):
    write_manifest(tmp_path, monkeypatch, {"x": url_entry(server, [{"path": "a.bin", "format": "safetensors", "sha256": None}])})
    with pytest.raises(WeightsError, match="null sha256 needs a 'sha256_note'"):
        weights.load_manifest()


def test_unknown_entry_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'sd15'"):
        weights.entry("sd1.5")


# ---------------------------------------------------------------------------------- pulling


def test_pull_lands_in_the_cache_with_the_right_bytes(home, tmp_path, monkeypatch, server):
    server.files["/tiny.safetensors"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD)}]),
    })
    path = weights.pull("tiny")
    assert path == home / "weights" / "tiny" / "tiny.safetensors"
    assert path.read_bytes() == GOOD
    assert weights.resolve("tiny") == path
    assert server.requests == 1  # resolve found it cached


def test_tampered_download_is_refused_and_leaves_nothing(home, tmp_path, monkeypatch, server):
    server.files["/tiny.safetensors"] = TAMPERED
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD)}]),
    })
    with pytest.raises(WeightsError) as info:
        weights.pull("tiny")
    message = str(info.value)
    assert sha(GOOD) in message and sha(TAMPERED) in message
    assert leftovers(home / "weights" / "tiny") == []


def test_offline_never_connects_and_names_the_missing_file(home, tmp_path, monkeypatch, server, capsys):
    server.files["/tiny.safetensors"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD)}]),
    })
    with pytest.raises(WeightsError, match=r"tiny\.safetensors.*diqa weights pull tiny"):
        weights.resolve("tiny", offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"tiny\.safetensors.*diqa weights pull tiny"):
        weights.pull("tiny")
    code, out, err = run_cli(["weights", "pull", "tiny", "--offline"], monkeypatch, capsys)
    assert code == 1 and "tiny.safetensors" in err and "diqa weights pull tiny" in err and out == ""
    assert server.requests == 0


def test_offline_flag_also_binds_weights_resolved_later_in_the_run(home, tmp_path, monkeypatch, server):
    """`--offline` on a command must also stop the lazy loads deep inside a model (prompt
    encoders, perceptual networks), which call resolve() without the flag."""
    server.files["/tiny.safetensors"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD)}]),
    })
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DIQA_OFFLINE", raising=False)
    from diqa_cli.home import offline_requested

    assert offline_requested(True)
    with pytest.raises(WeightsError, match=r"tiny\.safetensors.*diqa weights pull tiny"):
        weights.resolve("tiny")
    assert server.requests == 0


def test_pickle_is_refused_without_allow_pickle(home, tmp_path, monkeypatch, server):
    server.files["/model.pth"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "released": url_entry(server, [{"path": "model.pth", "format": "pickle", "sha256": sha(GOOD)}]),
    })
    with pytest.raises(WeightsError, match=r"pickle.*--allow-pickle.*diqa weights convert released"):
        weights.pull("released")
    assert server.requests == 0
    path = weights.pull("released", allow_pickle=True)
    assert path.read_bytes() == GOOD
    with pytest.raises(WeightsError, match="diqa weights convert released"):
        weights.resolve("released")  # cached, but only as a pickle


def test_unpinned_file_is_trusted_on_first_use_then_checked(home, tmp_path, monkeypatch, server, capsys):
    server.files["/drive.bin"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "drive": url_entry(server, [{"path": "drive.safetensors", "format": "safetensors", "sha256": None,
                                     "sha256_note": "no checksum published", "url": server.url + "/drive.bin"}]),
    })
    notes: list[str] = []
    path = weights.pull("drive", notify=notes.append)
    assert path.read_bytes() == GOOD
    assert sha(GOOD) in notes[0] and "not pinned upstream" in notes[0]
    lock = json.loads((home / "weights" / "weights.lock.json").read_text())
    assert lock["files"]["drive/drive.safetensors"]["sha256"] == sha(GOOD)
    [result] = weights.verify(["drive"])
    assert result.status == "ok-unpinned" and "not pinned upstream" in result.message
    # the server now hands out other bytes: a forced download is fine, but a re-download of a
    # deleted file is judged against the hash recorded the first time
    server.files["/drive.bin"] = TAMPERED
    path.unlink()
    with pytest.raises(WeightsError, match=sha(GOOD)):
        weights.pull("drive")
    assert leftovers(home / "weights" / "drive") == []


def test_verify_detects_a_corrupted_cached_file(home, tmp_path, monkeypatch, server, capsys):
    server.files["/tiny.safetensors"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD)}]),
    })
    path = weights.pull("tiny")
    assert [r.status for r in weights.verify()] == ["ok"]
    path.write_bytes(GOOD[:-1] + b"X")
    [result] = weights.verify()
    assert result.status == "mismatch" and not result.ok
    assert result.expected == sha(GOOD) and result.actual == sha(path.read_bytes())
    code, out, err = run_cli(["weights", "verify"], monkeypatch, capsys)
    assert code == 1 and out.startswith("mismatch\ttiny/tiny.safetensors") and "1 failed" in err
    # resolve refuses it too, and says how to fix it
    with pytest.raises(WeightsError, match="diqa weights pull tiny --force"):
        weights.resolve("tiny")
    with pytest.raises(WeightsError, match=r"cached tiny.safetensors does not match .*pull tiny --force"):
        weights.pull("tiny")  # without --force, pull will not paper over it
    weights.pull("tiny", force=True)
    assert path.read_bytes() == GOOD


def test_multi_file_entry_resolves_to_a_folder_and_parts_limit_the_work(home, tmp_path, monkeypatch, server):
    unet, config = b"unet weights", b'{"sample_size": 8}'
    server.files["/unet/diffusion_pytorch_model.safetensors"] = unet
    server.files["/unet/config.json"] = config
    write_manifest(tmp_path, monkeypatch, {
        "tinysd": url_entry(server, [
            {"path": "unet/diffusion_pytorch_model.safetensors", "format": "safetensors", "sha256": sha(unet)},
            {"path": "unet/config.json", "format": "json", "sha256": sha(config)},
            {"path": "vae/config.json", "format": "json", "sha256": sha(b"{}")},
        ], kind="diffusers-backbone"),
    })
    folder = weights.resolve("tinysd", parts=["unet"])
    assert folder == home / "weights" / "tinysd"
    assert (folder / "unet" / "config.json").read_bytes() == config
    assert not (folder / "vae").exists() and server.requests == 2
    with pytest.raises(WeightsError, match="vae/config.json"):
        weights.resolve("tinysd", download=False)


def test_hub_source_goes_through_huggingface_hub_and_is_checked(home, tmp_path, monkeypatch):
    """``hf://`` files are fetched by huggingface_hub into a staging folder, then hash-checked
    and renamed into the diqa cache (the hub download itself is replaced by a local writer)."""
    import huggingface_hub

    served = {"payload": GOOD}
    calls = []

    def fake_download(repo_id, filename, *, revision, local_dir, **kwargs):
        calls.append((repo_id, filename, revision))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(served["payload"])
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    write_manifest(tmp_path, monkeypatch, {
        "hubby": {
            "kind": "text-encoder", "description": "d", "licence": "l",
            "source": "hf://org/repo", "revision": "abc123",
            "files": [{"path": "model.safetensors", "format": "safetensors", "sha256": sha(GOOD)}],
        },
    })
    path = weights.resolve("hubby")
    assert path == home / "weights" / "hubby" / "model.safetensors" and path.read_bytes() == GOOD
    assert calls == [("org/repo", "model.safetensors", "abc123")]
    assert leftovers(home / "weights" / "hubby") == ["model.safetensors"]  # staging removed
    served["payload"] = TAMPERED
    with pytest.raises(WeightsError, match=sha(TAMPERED)):
        weights.pull("hubby", force=True)
    assert path.read_bytes() == GOOD  # the good copy was not replaced


# ---------------------------------------------------------------------------------- the CLI


def test_weights_list_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from diqa_cli.cli import main\n"
        "sys.argv = ['diqa', 'weights', 'list', '--format', 'json']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "DIQA_HOME": str(tmp_path / "home")}
    env.pop("DIQA_MANIFEST", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["sd15"]["cached"] == "no" and by_name["dpiqa-koniq"]["non_commercial"] is True
    assert {"name", "kind", "licence", "cached", "size"} <= set(rows[0])


def test_weights_list_csv_and_path(home, tmp_path, monkeypatch, server, capsys):
    server.files["/tiny.safetensors"] = GOOD
    write_manifest(tmp_path, monkeypatch, {
        "tiny": url_entry(server, [{"path": "tiny.safetensors", "format": "safetensors", "sha256": sha(GOOD), "size": len(GOOD)}]),
    })
    code, out, err = run_cli(["weights", "path", "tiny"], monkeypatch, capsys)
    assert code == 1 and out == "" and "diqa weights pull tiny" in err
    code, out, _ = run_cli(["weights", "pull", "tiny"], monkeypatch, capsys)
    assert code == 0 and out == ""  # messages only, on stderr
    code, out, _ = run_cli(["weights", "path", "tiny"], monkeypatch, capsys)
    assert code == 0 and out.strip() == str(home / "weights" / "tiny" / "tiny.safetensors")
    code, out, _ = run_cli(["weights", "list", "--format", "csv"], monkeypatch, capsys)
    assert code == 0 and out.splitlines() == ["name,kind,licence,cached,size", "tiny,head,test,yes,1.2 KB"]


# --------------------------------------------------------------------------------- convert


def test_convert_round_trips_a_wrapped_state_dict(tmp_path):
    import torch
    from safetensors.torch import load_file

    shared = torch.randn(4, 3)
    state = {"fc.weight": shared, "tied.weight": shared, "fc.bias": torch.arange(4.0)[::2]}
    src = tmp_path / "released.pyth"
    torch.save({"model_state": state, "epoch": 7}, src)
    dst = weights.convert(src, tmp_path / "out" / "released.safetensors")
    loaded = load_file(dst)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
    note = json.loads(dst.with_suffix(".conversion.json").read_text())
    assert note["source"] == "released.pyth" and note["source_sha256"] == weights.sha256_file(src)
    assert note["sha256"] == weights.sha256_file(dst) and note["unwrapped"] == ["model_state"]
    # Converting the same file again gives the same bytes (safetensors alone orders its metadata
    # at random).
    again = {weights.sha256_file(weights.convert(src, tmp_path / f"again{i}.safetensors")) for i in range(6)}
    assert again == {note["sha256"]}


class NotATensor:
    """A pickled object that ``weights_only=True`` must refuse to rebuild."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_convert_refuses_arbitrary_pickled_objects(tmp_path):
    import torch

    src = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": NotATensor()}, src)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused.*weights_only=True"):
        weights.convert(src, tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


class _PrefixConverter:
    """Stands for a method class whose released checkpoints use other key names."""

    @classmethod
    def convert_released_state_dict(cls, state):
        return {f"head.{k}": v for k, v in state.items()}


def test_convert_entry_maps_keys_through_the_method_and_resolves_to_the_copy(
    home, tmp_path, monkeypatch, server
):
    import torch
    from safetensors.torch import load_file

    from diqa_cli import methods

    methods._load_all()
    spec = methods.MethodSpec(
        name="test-convert", summary="s", paper="p", model=f"{__name__}:_PrefixConverter",
        default_backbone="sd15",
    )
    monkeypatch.setitem(methods._REGISTRY, spec.name, spec)
    src = tmp_path / "released.pth"
    torch.save({"module.w": torch.ones(3)}, src)
    server.files["/released.pth"] = src.read_bytes()
    write_manifest(tmp_path, monkeypatch, {
        "released": url_entry(server, [{"path": "released.pth", "format": "pickle",
                                        "sha256": weights.sha256_file(src)}], method="test-convert"),
    })
    weights.pull("released", allow_pickle=True)
    [out] = weights.convert_entry("released")
    assert out == home / "weights" / "released" / "released.safetensors"
    assert torch.equal(load_file(out)["head.w"], torch.ones(3))
    assert weights.resolve("released") == out  # the safetensors copy, no pickle needed
    statuses = {r.path: r.status for r in weights.verify(["released"])}
    assert statuses == {"released.pth": "ok", "released.safetensors": "ok"}


def test_the_packaged_manifest_is_the_top_level_one():
    """weights_manifest.json at the top of the repository is the one source of truth; the copy in
    the package (what an installed diqa reads) must be byte-identical (`make manifest` copies it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "diqa_cli" / "data" / "weights_manifest.json").read_bytes() == (root / "weights_manifest.json").read_bytes()
