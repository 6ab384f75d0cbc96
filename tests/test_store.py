"""The score store (`diqa score --db`), incremental re-scoring, `diqa db` and `diqa filter`.

Scores come from the real DP-IQA head on the tiny backbone (`diqa_cli.tiny`), scored in this
process through the `local` engine, as `diqa score --db` does.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diqa_cli.engines import LocalEngine, ScorerOptions
from diqa_cli.errors import UsageError
from diqa_cli.store import (
    MIGRATIONS,
    STORE_COLUMNS,
    Fingerprint,
    ReuseRun,
    ScoreSettings,
    content_hash,
    fingerprint,
    migrate,
    open_store,
)

DIQA = str(Path(sys.executable).with_name("diqa"))


# --- fixtures ------------------------------------------------------------------------------------


def _options(head, **overrides) -> ScorerOptions:
    return ScorerOptions(checkpoint=str(head), device="cpu", dtype="fp32", offline=True, batch_size=2, **overrides)


@pytest.fixture(scope="module")
def engine(dpiqa_head, model_home):
    with LocalEngine(_options(dpiqa_head)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def recalibrated_engine(dpiqa_head, model_home, tmp_path_factory):
    """The same head weights with another score normalisation in the sidecar."""
    from diqa_cli.checkpoint import sidecar_path

    other = tmp_path_factory.mktemp("recalibrated") / dpiqa_head.name
    shutil.copy(dpiqa_head, other)
    sidecar = json.loads(sidecar_path(dpiqa_head).read_text())
    sidecar["score_normalisation"] = {"offset": 1.0, "scale": 1.0}
    sidecar_path(other).write_text(json.dumps(sidecar))
    with LocalEngine(_options(other)) as loaded:
        yield loaded


@pytest.fixture
def photos(tmp_path, tiny_images):
    """good0..good3, a corrupt file and a missing one, in that order."""
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i, image in enumerate(tiny_images(4)):
        image.save(folder / f"good{i}.png")
        paths.append(str(folder / f"good{i}.png"))
    (folder / "corrupt.jpg").write_bytes(b"not an image at all\n" * 8)
    return [*paths, str(folder / "corrupt.jpg"), str(folder / "missing.png")]


def _scores(rows) -> dict[str, float | None]:
    return {row["path"]: row["score"] for row in rows}


def _close(a: float | None, b: float | None) -> bool:
    """Equal up to float noise (a batch's composition moves CPU results in the 8th digit);
    None (an error row) only equals None."""
    return a == b if a is None or b is None else abs(a - b) <= 1e-6


def _settings(method="dpiqa", **changes) -> ScoreSettings:
    base = dict(
        method=method, checkpoint_sha256="c" * 64, backbone_identity="b" * 64, seed=0,
        resolution=64, dtype="fp32", diqa_version="0.1.0",
    )
    return ScoreSettings(**{**base, **changes})



# --- schema and migrations -----------------------------------------------------------------------


def test_migrations_are_applied_once_in_order_and_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "scores.sqlite"
    with open_store(path) as store:
        applied = [name for (name,) in store.db.execute("SELECT name FROM _diqa_migrations ORDER BY rowid")]
        assert applied == [fn.__name__ for fn in MIGRATIONS]
        assert migrate(store.db) == []  # nothing left to do on the next open

        def m999_labels(db):
            db.execute("CREATE TABLE labels (path TEXT PRIMARY KEY, label TEXT)")

        assert migrate(store.db, [*MIGRATIONS, m999_labels]) == ["m999_labels"]
        store.db.execute("INSERT INTO labels VALUES ('a', 'b')")  # the new migration ran
    # This diqa does not know m999_labels: the database is refused, not misread.
    with pytest.raises(UsageError, match="newer diqa.*m999_labels"):
        open_store(path)


def test_bad_database_paths_are_usage_errors_naming_the_file(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="junk.sqlite.*not a diqa score database"):
        open_store(junk)
    with pytest.raises(UsageError, match="nowhere.sqlite.*does not exist"):
        open_store(tmp_path / "nowhere.sqlite", create=False)
    with pytest.raises(UsageError, match="is a folder"):
        open_store(tmp_path)


def test_content_hash_follows_the_bytes_not_the_name(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"
    a.write_bytes(b"\x89PNG same bytes")
    b.write_bytes(b"\x89PNG same bytes")
    c.write_bytes(b"\x89PNG same bytez")
    assert content_hash(a) == content_hash(b) != content_hash(c)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert content_hash(empty) == "99aa06d3014798d86001c324468d497f"  # XXH3-128 of no bytes
    fp = fingerprint(a)
    assert fp == Fingerprint(content_hash(a), 15, a.stat().st_mtime)
    assert fingerprint(tmp_path / "missing") is None and fingerprint(tmp_path) is None


def test_every_setting_is_part_of_the_reuse_key():
    base = _settings()
    changed = [
        _settings(method="genziqa"), _settings(checkpoint_sha256="d" * 64), _settings(backbone_identity="e" * 64),
        _settings(seed=1), _settings(resolution=512), _settings(dtype="fp16"), _settings(diqa_version="0.2.0"),
        _settings(head={"score_normalisation": {"offset": 1.0, "scale": 1.0}}),
        _settings(video={"fps_sub": 4.0, "max_frames": None, "max_clips": 16}),
    ]
    keys = {s.key for s in changed}
    assert base.key not in keys and len(keys) == len(changed)
    # Where the backbone lives does not change the scores it gives.
    assert _settings(backbone_ref="/elsewhere").key == base.key


# --- incremental scoring with the real tiny model ------------------------------------------------


def test_second_run_reuses_unchanged_files_and_scores_new_and_changed_ones(engine, photos, tmp_path, tiny_images):
    fresh = list(engine.score(photos))
    db = tmp_path / "scores.sqlite"
    with open_store(db) as store:
        first = ReuseRun(photos, engine, store)
        rows = list(first)
        assert (first.reused, first.scored) == (0, 6)
        assert [r["path"] for r in rows] == photos and not any(r["cached"] for r in rows)
        assert _scores(rows) == _scores(fresh)  # same batches, same numbers

        second = ReuseRun(photos, engine, store)
        rows = list(second)
        # The four good files come from the store; failures are always tried again.
        assert (second.reused, second.scored) == (4, 2)
        assert [r["cached"] for r in rows] == [True] * 4 + [False] * 2
        assert _scores(rows) == _scores(fresh)  # the stored values themselves
        assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"] * 2

        # Change good0, copy good1 to a new name, add a new file.
        folder = Path(photos[0]).parent
        tiny_images(6)[5].save(photos[0])
        shutil.copy(photos[1], folder / "copy_of_good1.png")
        tiny_images(5)[4].save(folder / "new.png")
        inputs = [*photos, str(folder / "copy_of_good1.png"), str(folder / "new.png")]
        third = ReuseRun(inputs, engine, store)
        rows = list(third)
        assert (third.reused, third.scored) == (4, 4)
        assert [r["cached"] for r in rows] == [False, True, True, True, False, False, True, False]
        got, before = _scores(rows), _scores(fresh)
        assert all(got[p] == before[p] for p in photos[1:4])
        assert got[inputs[6]] == before[photos[1]]  # the copy reuses its original's score
        changed = _scores(engine.score([photos[0], inputs[7]]))
        assert _close(got[photos[0]], changed[photos[0]]) and _close(got[inputs[7]], changed[inputs[7]])
        assert not _close(got[photos[0]], before[photos[0]])  # the changed file was scored again

        stored = {r["path"]: r for r in store.rows()}
        assert sorted(stored) == sorted(inputs)  # one row per path and settings
        assert stored[photos[0]]["content_hash"] == content_hash(photos[0])
        assert stored[str(folder / "copy_of_good1.png")]["score"] == stored[photos[1]]["score"]
        assert stored[photos[5]]["status"] == "error" and stored[photos[5]]["content_hash"] is None


def test_a_recalibrated_head_scores_again(engine, recalibrated_engine, photos, tmp_path):
    good = photos[:2]
    with open_store(tmp_path / "scores.sqlite") as store:
        before = list(ReuseRun(good, engine, store))
        other = ReuseRun(good, recalibrated_engine, store)
        after = list(other)
        assert (other.reused, other.scored) == (0, 2)
        assert [r["score"] for r in after] == pytest.approx([r["score"] + 1.0 for r in before], abs=1e-6)
        stored = list(store.rows())
        assert len(stored) == 4 and len({r["checkpoint_sha256"] for r in stored}) == 1


def test_an_interrupted_run_keeps_every_row_it_reported(engine, photos, tmp_path):
    db = tmp_path / "scores.sqlite"
    with open_store(db) as store:
        rows = iter(ReuseRun(photos, engine, store))
        reported = [next(rows)["path"] for _ in range(3)]
        rows.close()  # what Ctrl-C or a closed pipe does to the loop
    with sqlite3.connect(db) as fresh:
        kept = sorted(path for (path,) in fresh.execute("SELECT path FROM scores"))
    assert kept == sorted(reported)


_WRITER = textwrap.dedent(
    """
    import sys
    from diqa_cli.store import Fingerprint, ScoreSettings, open_store

    db, method = sys.argv[1], sys.argv[2]
    settings = ScoreSettings(method, "c" * 64, "b" * 64, 0, 64, "fp32", "0.1.0")
    with open_store(db) as store:
        for i in range(150):
            fp = Fingerprint(f"{i:032x}", i, float(i))
            store.record({"path": f"/photos/{i}.png", "score": i / 150, "raw_score": i / 150,
                          "status": "ok", "error": None, "seconds": 0.01}, fp, settings)
            assert store.lookup(fp, settings, f"/photos/{i}.png")["score"] == i / 150
    """
)


def test_two_processes_writing_one_database_at_once(tmp_path):
    db = tmp_path / "shared.sqlite"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(db), method], stderr=subprocess.PIPE, text=True)
        for method in ("dpiqa", "genziqa")
    ]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(check.execute("SELECT method, COUNT(*) FROM scores GROUP BY method"))
    assert counts == {"dpiqa": 150, "genziqa": 150}


# --- the command line ----------------------------------------------------------------------------


def test_score_with_db_reports_reuse_and_db_commands_read_it_back(dpiqa_head, photos, tmp_path, model_home, run_main):
    db = str(tmp_path / "scores.sqlite")
    args = ["score", "--checkpoint", str(dpiqa_head), "--device", "cpu", "--dtype", "fp32", "--db", db, "-f", "jsonl"]
    inputs = [photos[0], photos[1], photos[4]]  # two good files and the corrupt one
    code, out, err = run_main([*args, *inputs], home=model_home)
    assert code == 3
    assert "reused 0 of 3 results" in err
    first = [json.loads(line) for line in out.splitlines()]

    code, out, err = run_main([*args, *inputs], home=model_home)
    assert code == 3
    assert "reused 2 of 3 results" in err
    second = [json.loads(line) for line in out.splitlines()]
    assert [r["cached"] for r in second] == [True, True, False]
    assert [r["score"] for r in second] == [r["score"] for r in first]
    assert second[2]["error"] == first[2]["error"] and second[2]["status"] == "error"

    code, out, _ = run_main(["db", "show", db, "-f", "json"])
    assert code == 0
    shown = json.loads(out)
    assert [r["path"] for r in shown] == sorted(inputs)
    assert set(shown[0]) == {*STORE_COLUMNS, "details"}  # JSON carries the row's details object
    assert {r["method"] for r in shown} == {"dpiqa"} and {r["dtype"] for r in shown} == {"fp32"}

    code, out, _ = run_main(["db", "show", db, "-f", "csv"])
    assert out.splitlines()[0] == ",".join(STORE_COLUMNS) and len(out.splitlines()) == 4

    code, out, _ = run_main(["db", "stats", db, "-f", "json"])
    stats = json.loads(out)
    assert (stats["rows"], stats["ok"], stats["errors"]) == (3, 2, 1)
    (dpiqa,) = stats["methods"]
    assert dpiqa["ok"] == 2 and dpiqa["min"] <= dpiqa["median"] <= dpiqa["max"]
    assert stats["failures"] == [{"error": second[2]["error"], "count": 1}]

    code, out, _ = run_main(["db", "stats", db])
    assert code == 0 and "failures by reason" in out and second[2]["error"] in out


def test_a_run_whose_inputs_are_all_stored_builds_no_model(dpiqa_head, photos, tmp_path, model_home, run_main,
                                                            monkeypatch):
    from diqa_cli import engines

    db = str(tmp_path / "scores.sqlite")
    args = ["score", "--checkpoint", str(dpiqa_head), "--device", "cpu", "--dtype", "fp32", "--db", db, "-f", "csv"]
    code, first, _ = run_main([*args, *photos[:2]], home=model_home)
    assert code == 0

    built = []
    real_init = engines.Scorer.__init__

    def counting_init(self, options):
        built.append(options)
        real_init(self, options)

    monkeypatch.setattr(engines.Scorer, "__init__", counting_init)
    code, again, err = run_main([*args, *photos[:2]], home=model_home)
    assert code == 0 and again == first and "reused 2 of 2" in err
    assert built == [] and "loading backbone" not in err  # looked up, nothing loaded

    code, out, err = run_main([*args, *photos[:3]], home=model_home)  # one new file: now the model loads
    assert code == 0 and "reused 2 of 3" in err and len(built) == 1
    assert out.splitlines()[:3] == first.splitlines()


def test_db_commands_refuse_a_missing_database(tmp_path, run_main):
    code, _, err = run_main(["db", "show", str(tmp_path / "nope.sqlite")])
    assert code == 2 and "nope.sqlite" in err and "does not exist" in err
    assert not (tmp_path / "nope.sqlite").exists()


@pytest.fixture
def ranked_db(tmp_path):
    """A database holding dpiqa scores of five real files (one re-scored later) and one
    genziqa score; ``(db, files)``."""
    folder = tmp_path / "lib"
    files = {}
    for name, sub in (("a.jpg", "x"), ("b.jpg", "x"), ("c.jpg", "x"), ("a.jpg", "y"), ("gone.jpg", "x")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        path = folder / sub / name
        path.write_bytes(f"{sub}/{name}".encode())
        files[f"{sub}/{name}"] = str(path)
    db = tmp_path / "ranked.sqlite"
    scores = {"x/a.jpg": 0.9, "x/b.jpg": 0.5, "x/c.jpg": 0.2, "y/a.jpg": 0.7, "x/gone.jpg": 0.8}
    with open_store(db) as store:
        for key, score in scores.items():
            row = {"path": files[key], "score": score, "raw_score": score, "status": "ok", "error": None}
            store.record(row, fingerprint(files[key]), _settings(), scored_at="2026-01-01T00:00:00+00:00")
        # x/c.jpg scored again later with another checkpoint: its latest score counts.
        row = {"path": files["x/c.jpg"], "score": 0.95, "raw_score": 0.95, "status": "ok", "error": None}
        later = "2026-02-01T00:00:00+00:00"
        store.record(row, fingerprint(files["x/c.jpg"]), _settings(checkpoint_sha256="f" * 64), scored_at=later)
        row = {"path": files["x/b.jpg"], "score": 3.0, "raw_score": 3.0, "status": "ok", "error": None}
        store.record(row, fingerprint(files["x/b.jpg"]), _settings(method="genziqa"))
    os.remove(files["x/gone.jpg"])
    return db, files


def test_filter_prints_the_best_first_and_needs_a_method_when_there_are_several(ranked_db, run_main):
    db, files = ranked_db
    code, _, err = run_main(["filter", str(db), "--min-score", "0.6"])
    assert code == 2 and "dpiqa, genziqa" in err and "--method" in err

    code, out, _ = run_main(["filter", str(db), "--method", "dpiqa", "--min-score", "0.6"])
    assert code == 0
    assert out.splitlines() == [files["x/c.jpg"], files["x/a.jpg"], files["x/gone.jpg"], files["y/a.jpg"]]

    code, out, _ = run_main(["filter", str(db), "-m", "dpiqa", "--min-score", "0.6", "--max-score", "0.85"])
    assert out.splitlines() == [files["x/gone.jpg"], files["y/a.jpg"]]

    code, _, err = run_main(["filter", str(db), "-m", "lgdm"])
    assert code == 2 and "no scores of method 'lgdm'" in err

    # Method names as everywhere else: any letter case, aliases, and the registry's did-you-mean.
    code, out, _ = run_main(["filter", str(db), "-m", "DPIQA", "--min-score", "0.6", "--max-score", "0.85"])
    assert code == 0 and out.splitlines() == [files["x/gone.jpg"], files["y/a.jpg"]]
    for command in (["filter", str(db)], ["db", "show", str(db)], ["db", "stats", str(db)]):
        code, _, err = run_main([*command, "-m", "dpqia"])
        assert code == 2 and "unknown method 'dpqia'" in err and "did you mean 'dpiqa'" in err, err


def test_store_commands_print_paths_as_score_printed_them(ranked_db, tmp_path, run_main, monkeypatch):
    db, files = ranked_db
    monkeypatch.chdir(tmp_path / "lib")  # as if `diqa score x/ y/ --db …` had run here
    code, out, _ = run_main(["filter", str(db), "-m", "dpiqa", "--min-score", "0.6"])
    assert code == 0 and out.splitlines() == ["x/c.jpg", "x/a.jpg", "x/gone.jpg", "y/a.jpg"]
    code, out, _ = run_main(["db", "show", str(db), "-m", "dpiqa", "-f", "csv"])
    assert code == 0 and "\nx/a.jpg," in out
    monkeypatch.chdir(tmp_path / "lib" / "x")  # files outside the current folder stay absolute
    code, out, _ = run_main(["filter", str(db), "-m", "dpiqa", "--min-score", "0.6"])
    assert out.splitlines() == ["c.jpg", "a.jpg", "gone.jpg", files["y/a.jpg"]]


def test_filter_copy_to_keeps_both_same_named_files_and_reports_missing_ones(ranked_db, tmp_path, run_main):
    db, files = ranked_db
    best = tmp_path / "best"
    args = ["filter", str(db), "-m", "dpiqa", "--min-score", "0.6", "--copy-to", str(best)]
    code, out, err = run_main(args)
    assert code == 3 and out == ""
    assert "gone.jpg: not copied" in err and "copied 3 of 4 files" in err
    assert sorted(p.name for p in best.iterdir()) == ["a-1.jpg", "a.jpg", "c.jpg"]
    assert {p.read_bytes() for p in best.glob("a*.jpg")} == {b"x/a.jpg", b"y/a.jpg"}
    run_main(args)  # again: nothing is copied twice or overwritten
    assert sorted(p.name for p in best.iterdir()) == ["a-1.jpg", "a.jpg", "c.jpg"]


def test_filter_print0_gives_back_names_that_are_not_utf8(tmp_path):
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 name: not valid UTF-8
    path = tmp_path / odd
    path.write_bytes(b"pixels")
    db = tmp_path / "scores.sqlite"
    with open_store(db) as store:
        row = {"path": str(path), "score": 1.0, "raw_score": 1.0, "status": "ok", "error": None}
        store.record(row, fingerprint(path), _settings())
        assert [r["path"] for r in store.rows()] == [str(path)]
    result = subprocess.run([DIQA, "filter", str(db), "--print0"], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == os.fsencode(str(path)) + b"\0"


def test_selections_by_head_and_a_warning_when_they_mix_scales(ranked_db, tmp_path, run_main):
    """Two dpiqa heads (checkpoints) score on two scales: show, stats and filter take --checkpoint
    (a SHA-256 prefix or the head file) and warn when what they print mixes heads."""
    from diqa_cli.files import file_sha256

    db, files = ranked_db
    code, out, err = run_main(["filter", str(db), "-m", "dpiqa", "--min-score", "0.6"])
    assert code == 0 and "2 heads" in err and "--checkpoint" in err  # still the latest score of each file

    code, out, err = run_main(["filter", str(db), "-m", "dpiqa", "-c", "ffffff", "--min-score", "0.6"])
    assert code == 0 and err == "" and out.splitlines() == [files["x/c.jpg"]]
    code, out, err = run_main(["filter", str(db), "-m", "dpiqa", "-c", "0" * 12])
    assert code == 2 and "no dpiqa scores of checkpoint 000000000000" in err

    head = tmp_path / "head.safetensors"
    head.write_bytes(b"a head")
    code, _, err = run_main(["db", "show", str(db), "-c", str(head), "-f", "csv"])
    assert code == 0 and file_sha256(head)[:12] not in err  # nothing stored for it: no rows, no mix
    code, out, err = run_main(["db", "show", str(db), "-m", "dpiqa", "-f", "csv"])
    assert "2 heads" in err and len(out.splitlines()) == 1 + 6  # x/c.jpg has a row under each head

    code, out, _ = run_main(["db", "stats", str(db), "-f", "json"])
    heads = [(h["method"], h["checkpoint_sha256"][:6]) for h in json.loads(out)["methods"]]
    assert ("dpiqa", "ffffff") in heads and len(heads) == 3
    code, out, _ = run_main(["db", "stats", str(db), "-m", "dpiqa", "-c", "ffffff", "-f", "json"])
    assert [h["ok"] for h in json.loads(out)["methods"]] == [1]
    code, _, err = run_main(["db", "show", str(db), "-c", "not-a-sha"])
    assert code == 2 and "--checkpoint" in err
