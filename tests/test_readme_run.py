"""Every `diqa` command line the README shows runs, as written, on the tiny bundle: exit 0.

The lines run in README order, each in its own bash shell, in a fresh copy of a folder that
holds what the README assumes (photos/, clip.mp4, heads/, labels.csv, score files, the published
dataset layouts under ~/datasets), with one weights cache shared by all of them, as a user
following the README would have. The manifest's released DP-IQA head, SD 1.5 and CLIP are the tiny
bundle's files served by a local HTTP server (random weights: the road is real, the numbers mean
nothing), so the opening `diqa weights pull --for dpiqa` really downloads, asks about the licence
(answered on a pseudo-terminal) and converts.

Only time is bent: options that shorten a run without changing what it does are appended to the
few lines that would take minutes on 2 CPU cores (`APPENDED` names them). The output a line
writes with `--out` / `-o` is removed from its copy first, as on a first run.
"""

from __future__ import annotations

import io
import json
import os
import pty
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_labels import _clive, _koniq, _konvid
from test_readme_commands import README
from test_videoio import encode
from test_weights import FileServer, sha

pytestmark = pytest.mark.slow

DIQA = str(Path(sys.executable).with_name("diqa"))

# Appended to a line whose first words match, to keep the run short (the README's defaults are
# the papers' settings: 50 EDICT steps and 50 iterations, 30 epochs).
APPENDED = {
    ("enhance",): "--iterations 2 --inversion-steps 4",
    ("train",): "--epochs 1",
    ("distill",): "--epochs 1",
    # The released student is EfficientNet-B7 at 512 px; at 64 px one epoch takes seconds here.
    ("train", "-m", "dpiqa-student"): "--epochs 1 --config {\"resolution\":64}",
}


def readme_lines(numbered: bool = False) -> list:
    """The `$ diqa …` lines of the README (pipelines and redirections included), in order; with
    ``numbered``, as (README line number, line)."""
    lines = []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("$ ") and any(w == "diqa" for w in shlex.split(line[2:], comments=True)):
            lines.append((number, line[2:]) if numbered else line[2:])
    return lines


def appended(line: str) -> str:
    words = shlex.split(line, comments=True)
    after = words[words.index("diqa") + 1:]
    best = max((k for k in APPENDED if tuple(after[: len(k)]) == k), key=len, default=None)
    return APPENDED[best] if best else ""


def written_output(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "-o")]


# --- the folder the README assumes -----------------------------------------------------------------


def _served_manifest(server: FileServer, tiny: Path, home: Path) -> Path:
    """The shipped manifest with its DP-IQA head, SD 1.5 and CLIP entries served from the tiny
    bundle's files (SD 1.5 in its published diffusers layout; the head as a pickle with its VAE)."""
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.weights import manifest_path

    manifest = json.loads(manifest_path().read_text(encoding="utf-8"))

    def serve_folder(name: str, root: Path) -> list[dict]:
        files = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            body = path.read_bytes()
            server.files[f"/{name}/{rel}"] = body
            fmt = {".json": "json", ".txt": "txt", ".safetensors": "safetensors"}.get(path.suffix, "txt")
            files.append({"path": rel, "format": fmt, "sha256": sha(body), "size": len(body)})
        return files

    entries = manifest["entries"]
    entries["sd15"].update(source=server.url + "/sd15", files=serve_folder("sd15", tiny / "backbone"))
    entries["clip-vit-large-patch14"].update(source=server.url + "/clip", files=serve_folder("clip", tiny / "clip"))
    backbone = load_backbone(str(tiny / "backbone"), device="cpu", dtype="fp32", offline=True)
    teacher = DPIQA(backbone, clip=str(tiny / "clip"))
    released = {**teacher.checkpoint_state_dict(), **{f"vae.{k}": v for k, v in backbone.vae.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(released, buffer)
    (head_file,) = entries["dpiqa-koniq"]["files"]
    server.files[f"/drive/{head_file['path']}"] = buffer.getvalue()
    head_file["url"] = f"{server.url}/drive/{head_file['path']}"
    entries["dpiqa-koniq"]["source"] = server.url + "/drive"
    pickles = _published_pickles(server, entries)
    path = home / "manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path, pickles


def _serve_pickle(server: FileServer, entry: dict, state: dict) -> None:
    """Serve ``state`` as ``entry``'s one pickle file, its hash recorded (stand-in weights)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    body = buffer.getvalue()
    (file,) = entry["files"]
    server.files[f"/{entry['name']}/{file['path']}"] = body
    file.pop("sha256_prefix", None)
    file.update(sha256=sha(body), size=len(body), url=f"{server.url}/{entry['name']}/{file['path']}")


def _published_pickles(server: FileServer, entries: dict) -> list[str]:
    """Random weights in the real architectures for the entries a README line reads after the
    user pulled and converted them (the README says how): ImageNet EfficientNet-B7 for
    `--init imagenet`, SlowFast R50 for GenzVQA training. Returns their names."""
    import torch
    import torchvision

    from diqa_cli.models.slowfast import SLOWFAST_R50_CONFIG, SlowFastFeatures

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        _serve_pickle(server, entries["efficientnet-b7-imagenet"], torchvision.models.efficientnet_b7(weights=None).state_dict())
        slowfast = SlowFastFeatures(SLOWFAST_R50_CONFIG).net.state_dict()  # the zoo's key names
        _serve_pickle(server, entries["slowfast-r50-k400"], {"model_state": slowfast})  # the zoo's wrapper
    return ["efficientnet-b7-imagenet", "slowfast-r50-k400"]


def _labels(path: Path, files: list[str], columns=("path", "mos", "split")) -> None:
    splits = ["train", "train", "val", "test"]
    rows = [",".join(columns)]
    rows += [f"{name},{(i * 37 % 11) / 10:.1f},{splits[i % 4]}" for i, name in enumerate(files)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_images):
    """``(work, env)``: the folder each line starts from (copied per line) and the environment."""
    from diqa_cli.tiny import write_tiny_bundle

    root = tmp_path_factory.mktemp("readme")
    tiny = write_tiny_bundle(root / "bundle")
    home = root / "home"
    work = root / "work"
    for folder in (home, work / "photos" / "more", work / "clips", work / "best", home / "data" / "photos"):
        folder.mkdir(parents=True)
    server = FileServer()
    manifest, pickles = _served_manifest(server, tiny, home)
    env = {
        **os.environ,
        "HOME": str(home),
        "DIQA_HOME": str(home / ".cache" / "diqa"),
        "DIQA_MANIFEST": str(manifest),
        "PATH": f"{Path(DIQA).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("HF_HUB_OFFLINE", "DIQA_OFFLINE"):  # the weights come over the (local) network
        env.pop(name, None)
    for name in pickles:  # as the README tells: pull the pickle, convert it to safetensors
        for command in (["weights", "pull", name, "--allow-pickle"], ["weights", "convert", name]):
            done = subprocess.run([DIQA, *command], env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr

    images = tiny_images(8, 96)
    for i, image in enumerate(images[:4]):
        image.save(work / "photos" / f"p{i}.jpg", quality=90)
    images[4].save(work / "photos" / "a.png")
    images[5].save(work / "photos" / "b.png")
    images[6].save(work / "photos" / "more" / "c.png")
    images[7].save(work / "in.png")
    for i, image in enumerate(images[:4]):  # ratings.csv's files: beside it, and in ~/data/photos
        image.save(home / "data" / "photos" / f"r{i}.png")
        image.save(work / f"r{i}.png")
    encode(work / "clip.mp4", "libx264", noise=True)
    encode(work / "other.webm", "libvpx-vp9")
    encode(work / "clips" / "c1.mp4", "libx264", noise=True)

    (work / "heads").mkdir()
    for name in ("dpiqa", "genziqa", "genzvqa", "lgdm", "dpiqa-student"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(tiny / "heads" / f"{name}{suffix}", work / "heads" / f"{name}{suffix}")
    for name in ("genzvqa", "lgdm"):  # the opening lines name heads in the current folder
        for suffix in (".safetensors", ".json"):
            shutil.copy(tiny / "heads" / f"{name}{suffix}", work / f"{name}{suffix}")
    sidecar = json.loads((work / "genzvqa.json").read_text())
    sidecar["config"]["slowfast"] = "slowfast.safetensors"  # beside this copy of the head
    (work / "genzvqa.json").write_text(json.dumps(sidecar))
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny / "heads" / f"dpiqa-student{suffix}", work / "heads" / f"student-koniq{suffix}")
    # heads/genzvqa.json names its clip encoder ../slowfast.safetensors, as in the bundle.
    shutil.copy(tiny / "slowfast.safetensors", work / "slowfast.safetensors")
    shutil.copy(tiny / "slowfast.json", work / "slowfast.json")

    photos = [f"photos/p{i}.jpg" for i in range(4)] + ["photos/a.png", "photos/b.png", "photos/more/c.png", "in.png"]
    _labels(work / "labels.csv", photos)
    _labels(work / "ratings.csv", [f"r{i}.png" for i in range(4)], columns=("file", "score", "fold"))
    datasets = home / "datasets"
    _koniq(datasets / "koniq10k", tiny_images)
    _clive(datasets / "ChallengeDB_release", tiny_images)
    konvid = datasets / "KoNViD_1k"
    konvid.mkdir(parents=True)
    _konvid(konvid, tiny_images)

    # Score files for `diqa report`, written by diqa itself.
    score = [DIQA, "score", "photos", "-r", "-c", "heads/dpiqa.safetensors", "--offline"]
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    for fmt, target in (("csv", "scores.csv"), ("jsonl", "scores.jsonl")):
        done = subprocess.run([*score, "-f", fmt], cwd=work, env=offline_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        (work / target).write_text(done.stdout, encoding="utf-8")
    done = subprocess.run([*score, "--db", "scores.sqlite"], cwd=work, env=offline_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    yield work, env
    server.close()


def _run_line(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """One README line in bash (pipes fail the line), with `diqa` taking the appended options; a
    line that may ask a question gets a pseudo-terminal as stdin, answered yes."""
    script = f'set -o pipefail\ndiqa() {{ command diqa "$@" $README_APPENDED; }}\n{line}\n'
    env = {**env, "README_APPENDED": appended(line)}
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=secondary,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(primary, b"y\n" * 8)
        out, err = process.communicate(timeout=900)
    finally:
        os.close(primary)
        os.close(secondary)
    return subprocess.CompletedProcess(line, process.returncode, out, err)


def test_the_readme_shows_every_command_kind():
    commands = {shlex.split(line, comments=True)[1] for line in readme_lines()}
    assert {"score", "score-video", "enhance", "weights", "train", "eval", "report", "filter", "db"} <= commands


@pytest.fixture(scope="module")
def set_up(sandbox):
    """The README's first line, `diqa weights pull --for dpiqa`, run once for all (the others
    need its weights), answering its licence question on a terminal."""
    work, env = sandbox
    first = readme_lines()[0]
    assert shlex.split(first, comments=True)[1:4] == ["weights", "pull", "--for"]
    result = _run_line(first, work, env)
    assert result.returncode == 0, result.stderr
    assert "Accept this licence?" in result.stderr and "dpiqa is ready" in result.stderr
    assert result.stdout == ""  # the question and its answer stay off the data stream
    return work, env


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("line", readme_lines(), ids=[f"README.md:{n}" for n, _ in readme_lines(numbered=True)])
def test_readme_line_runs_on_the_tiny_bundle(line, set_up, tmp_path):
    work, env = set_up
    cwd = tmp_path / "work"
    shutil.copytree(work, cwd, symlinks=True)
    for output in written_output(line):
        target = cwd / output
        if target.is_file():
            target.unlink()
            target.with_suffix(".json").unlink(missing_ok=True)
    result = _run_line(line, cwd, env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
