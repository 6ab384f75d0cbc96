"""`--engine ray`: Ray Data's actor pool runs the same scorer as the single process.

One local Ray instance for the whole module (started by diqa's own `connect`, on 127.0.0.1
only, two CPUs, no dashboard), CPU actors, the tiny backbone's DP-IQA head. Skipped, with the
reason, where Ray is not installed; the install hint itself is tested either way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import sys

import pytest

from diqa_cli.engines import LocalEngine, ScorerOptions
from diqa_cli.imageio import expand_inputs
from diqa_cli.store import ReuseRun, open_store

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'diqa-cli[ray]')"
)


def _options(head) -> ScorerOptions:
    return ScorerOptions(checkpoint=str(head), device="cpu", dtype="fp32", offline=True, batch_size=2)


@pytest.fixture(scope="module")
def ray_instance(dpiqa_head, model_home):
    """diqa's own local Ray instance; its workers inherit the module's DIQA_HOME, where the
    head's prompt embeddings are cached."""
    from diqa_cli.engines.ray_engine import connect

    assert connect(num_cpus=2), "a Ray instance was already running in this process"
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local(dpiqa_head, model_home):
    with LocalEngine(_options(dpiqa_head)) as engine:
        yield engine


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_images):
    """Four good images, then a corrupt, a truncated, a missing file and a glob matching nothing."""
    folder = tmp_path_factory.mktemp("ray_inputs")
    good = []
    for i, image in enumerate(tiny_images(4)):
        image.save(folder / f"good{i}.png")
        good.append(str(folder / f"good{i}.png"))
    (folder / "corrupt.jpg").write_bytes(b"not an image\n" * 20)
    (folder / "truncated.png").write_bytes((folder / "good0.png").read_bytes()[:200])
    args = [*good, str(folder / "corrupt.jpg"), str(folder / "truncated.png"), str(folder / "missing.png"), str(folder / "*.tif")]
    return expand_inputs(args)


def _assert_same_rows(rows, reference):
    assert [r["path"] for r in rows] == [r["path"] for r in reference]
    for got, want in zip(rows, reference, strict=True):
        assert (got["status"], got["error"]) == (want["status"], want["error"]), got["path"]
        if want["status"] == "ok":
            assert got["score"] == pytest.approx(want["score"], rel=0, abs=1e-5)
            assert got["raw_score"] == pytest.approx(want["raw_score"], rel=0, abs=1e-5)
        else:
            assert got["score"] is None


@needs_ray
def test_local_instance_listens_on_loopback_only(ray_instance):
    import psutil

    ours = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found no listening sockets of the Ray processes"
    exposed = {c.laddr.ip for c in listening if not _loopback(c.laddr.ip)}
    assert not exposed, f"Ray listens on {exposed}"


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


@needs_ray
def test_score_dataset_gives_the_single_process_rows(ray_instance, dpiqa_head, local, inputs):
    from diqa_cli.engines.ray_engine import ROW_COLUMNS, score_dataset

    reference = list(local.score(inputs))
    # A user's own dataset, with its own column name; actors return rows in any order.
    ds = ray_instance.data.from_items([{"file": item.path} for item in inputs if item.error is None])
    rows = score_dataset(ds, _options(dpiqa_head), actors=2, path_column="file", rows_per_call=3).take_all()
    assert all(set(row) == set(ROW_COLUMNS) for row in rows)
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows) == len(inputs) - 1  # every input once
    expected = [r for r in reference if r["path"] in by_path]  # all but the glob matching nothing
    _assert_same_rows([by_path[r["path"]] for r in expected], expected)


@needs_ray
def test_ray_engine_reuses_stored_results_and_scores_the_rest_in_order(ray_instance, dpiqa_head, local, inputs, tmp_path):
    from diqa_cli.engines.ray_engine import RayEngine

    reference = list(local.score(inputs))
    with open_store(tmp_path / "scores.sqlite") as store:
        list(ReuseRun(inputs[:2], local, store))  # a single-process run scored two files before
        with RayEngine(_options(dpiqa_head), actors=2) as engine:
            assert engine.settings() == local.settings()  # the actors' settings key the same results
            run = ReuseRun(inputs, engine, store)
            rows = list(run)
        assert (run.reused, run.scored) == (2, len(inputs) - 2)
        assert [r["cached"] for r in rows] == [True, True] + [False] * (len(inputs) - 2)
        _assert_same_rows(rows, reference)
        assert [r["status"] for r in rows[4:]] == ["error"] * 4
        assert len(list(store.rows())) == len(inputs)
    assert ray_instance.is_initialized()  # the engine left the instance it did not start running


@pytest.fixture(scope="module")
def genzvqa_head(tiny_backbone, tmp_path_factory):
    """A GenzVQA head in the tiny bundle's layout (its SlowFast one folder up)."""
    import torch

    from diqa_cli.checkpoint import save_head
    from diqa_cli.models.genzvqa import GenzVQA
    from diqa_cli.models.slowfast import write_tiny_slowfast

    folder = tmp_path_factory.mktemp("genzvqa")
    write_tiny_slowfast(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = GenzVQA(tiny_backbone, **GenzVQA.tiny_config())
    return save_head(model, folder / "heads" / "genzvqa.safetensors", normalisation={"offset": 0.0, "scale": 1.0})


@needs_ray
def test_videos_on_ray_give_the_single_process_rows(ray_instance, genzvqa_head, tmp_path):
    from test_videoio import encode

    from diqa_cli.engines.ray_engine import RayEngine

    clip = str(encode(tmp_path / "clip.mp4", "libx264", noise=True))
    inputs = expand_inputs([clip, str(tmp_path / "missing.mp4")], kind="video")
    options = dataclasses.replace(_options(genzvqa_head), max_frames=3, max_clips=1, per_frame=True)
    with LocalEngine(options) as local:
        reference = list(local.score(inputs))
    with RayEngine(options, actors=1) as engine:
        rows = list(engine.score(inputs))
    _assert_same_rows(rows, reference)
    for key in ("frames_sampled", "frames_decoded", "frames_lost", "decoder", "clips", "slowfast"):
        assert rows[0][key] == reference[0][key], key
    assert [f["time"] for f in rows[0]["per_frame"]] == [f["time"] for f in reference[0]["per_frame"]]


def test_without_ray_the_engine_says_how_to_install_it(dpiqa_head, monkeypatch, run_main):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    code, out, err = run_main(["score", "--engine", "ray", "--checkpoint", str(dpiqa_head), str(dpiqa_head)])
    assert code == 2 and out == ""
    assert "--engine ray needs Ray Data" in err and "pip install 'diqa-cli[ray]'" in err

    code, _, err = run_main(["score", "--ray-actors", "2", "--checkpoint", str(dpiqa_head), str(dpiqa_head)])
    assert code == 2 and "--ray-address and --ray-actors need --engine ray" in err


@needs_ray
def test_ray_start_notice_about_token_auth_is_dropped_but_its_off_warning_kept(caplog):
    import logging

    from diqa_cli.engines.ray_engine import _drop_token_notice

    name = "ray._private.authentication.authentication_token_setup"
    assert importlib.util.find_spec(name) is not None, "Ray moved the module whose notice diqa drops"
    _drop_token_notice()
    logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [r.getMessage().split(".")[0] for r in caplog.records] == ["Token authentication is disabled for this Ray cluster"]
