"""The score store: one SQLite file of results, so a re-run scores only new or changed files.

``diqa score … --db scores.sqlite`` records one row per input and settings; ``diqa db`` and
``diqa filter`` read it back. This module never imports torch (the ``db`` commands use it).

* **Reuse key.** A result is reused when the file's *content* (xxHash XXH3-128 of its bytes) and
  the *settings* that produced it are the same: method, checkpoint SHA-256, backbone identity,
  seed, resolution, dtype and diqa version, plus the head's score normalisation and config (a
  recalibrated sidecar changes scores without changing the weights file). Only ``ok`` results are
  reused; error rows are recomputed on every run, since a failure may be transient (out of
  memory, a file still being copied). A file moved or copied to a new path reuses its score.
* **One row per (path, settings).** Paths are stored absolute; re-scoring a changed file
  replaces its row. Paths that are not valid UTF-8 are stored as BLOBs of their bytes, so they
  come back unchanged.
* **Concurrency and interruption.** WAL journal, a busy timeout, and one short ``BEGIN
  IMMEDIATE`` transaction per recorded row: an interrupted run keeps every row it reported, and
  two runs writing one database wait for each other instead of failing or corrupting it. WAL
  needs a local filesystem (not NFS/SMB).
* **Migrations** are ordered, named functions (the pattern of simonw/llm's ``migrations.py``);
  the applied names are kept in ``_diqa_migrations``. A database written by a newer diqa (with
  migrations this one does not know) is refused rather than misread.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diqa_cli.errors import UsageError

__all__ = [
    "MIGRATIONS",
    "STORE_COLUMNS",
    "Fingerprint",
    "ReuseRun",
    "ScoreSettings",
    "ScoreStore",
    "content_hash",
    "fingerprint",
    "migrate",
    "open_store",
]

BUSY_TIMEOUT_S = 30.0
_HASH_CHUNK = 1 << 20
_MIGRATIONS_TABLE = "_diqa_migrations"

# What `diqa db show` prints, in this order.
STORE_COLUMNS = (
    "path", "score", "raw_score", "status", "error", "method", "checkpoint_sha256",
    "backbone_identity", "seed", "resolution", "dtype", "diqa_version", "content_hash", "size",
    "mtime", "seconds", "scored_at", "settings_key", "map",
)
# Row fields the store keeps in columns of their own (or that describe the run, not the result);
# anything else a scoring row holds (a video's frame counts, decoder, per-frame scores) is kept
# as JSON in ``details`` and given back when the result is reused.
_OWN_FIELDS = frozenset((*STORE_COLUMNS, "cached", "checkpoint", "backbone"))

# --------------------------------------------------------------------------- migrations

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    """Register ``fn`` as the next migration; its name is what ``_diqa_migrations`` records, so a
    migration is never renamed or reordered once released."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_scores(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE scores (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL,              -- absolute; a BLOB when the name is not UTF-8
            content_hash TEXT,               -- XXH3-128 hex of the bytes; NULL if unreadable
            size INTEGER,
            mtime REAL,
            settings_key TEXT NOT NULL,      -- SHA-256 of the canonical settings JSON
            method TEXT NOT NULL,
            checkpoint_sha256 TEXT,
            backbone_identity TEXT,
            seed INTEGER,
            resolution INTEGER,
            dtype TEXT,
            diqa_version TEXT,
            score REAL,
            raw_score REAL,
            status TEXT NOT NULL,            -- 'ok' or 'error'
            error TEXT,
            seconds REAL,
            scored_at TEXT NOT NULL,         -- ISO 8601, UTC
            UNIQUE (path, settings_key)
        )
        """
    )
    db.execute("CREATE INDEX scores_reuse ON scores (content_hash, settings_key)")
    db.execute("CREATE INDEX scores_method_score ON scores (method, score)")


@migration
def m002_map(db: sqlite3.Connection) -> None:
    # The quality-map overlay a run wrote for the row (``diqa score --maps``); NULL when none.
    db.execute("ALTER TABLE scores ADD COLUMN map TEXT")


@migration
def m003_details(db: sqlite3.Connection) -> None:
    # The row's other fields as a JSON object (``diqa score-video``: frames, decoder, duration,
    # per-frame scores); NULL when there are none.
    db.execute("ALTER TABLE scores ADD COLUMN details TEXT")


def migrate(db: sqlite3.Connection, migrations: list | None = None) -> list[str]:
    """Apply the migrations ``db`` lacks, in order, in one transaction; returns their names.

    Two processes opening a new database at once both get here: the ``IMMEDIATE`` transaction
    makes the second wait and then find the migrations applied.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    known = [fn.__name__ for fn in migrations]
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"CREATE TABLE IF NOT EXISTS {_MIGRATIONS_TABLE} (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        applied = {name for (name,) in db.execute(f"SELECT name FROM {_MIGRATIONS_TABLE}")}
        unknown = sorted(applied - set(known))
        if unknown:
            raise UsageError(
                f"this score database was written by a newer diqa (it has migration {unknown[-1]!r}, "
                f"which this diqa does not know); upgrade diqa, or use another --db file"
            )
        done = []
        for fn in migrations:
            if fn.__name__ not in applied:
                fn(db)
                db.execute(f"INSERT INTO {_MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)", (fn.__name__, _now()))
                done.append(fn.__name__)
        db.execute("COMMIT")
        return done
    except BaseException:
        db.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- content and settings


@dataclass(frozen=True)
class Fingerprint:
    """What a file was when it was hashed."""

    content_hash: str
    size: int
    mtime: float


def content_hash(path: str | os.PathLike) -> str:
    """XXH3-128 of the file's bytes, hex: fast enough to re-hash a photo library on every run
    (several GB/s, disk-bound), and the reuse key needs no cryptographic strength."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> Fingerprint | None:
    """The file's hash, size and mtime; None when it is not a readable regular file (the scorer
    then gives the row its error)."""
    try:
        stat = os.stat(path)
        if not os.path.isfile(path):
            return None
        return Fingerprint(content_hash(path), stat.st_size, stat.st_mtime)
    except OSError:
        return None


@dataclass(frozen=True)
class ScoreSettings:
    """Everything that decides a score besides the image; equal settings give equal scores.

    ``head`` carries the sidecar's score normalisation and the model config, ``video`` what a
    video's score also depends on (``--fps-sub``, ``--max-frames``, ``--max-clips``, ``--slowfast``). ``backbone_ref``
    is what the user named the backbone, reported in rows but not part of the key (the same
    weights under another path give the same scores).
    """

    method: str
    checkpoint_sha256: str
    backbone_identity: str
    seed: int
    resolution: int
    dtype: str
    diqa_version: str
    head: dict = field(default_factory=dict)
    video: dict = field(default_factory=dict)  # a video score's frame choice and clip encoder
    backbone_ref: str = ""

    @property
    def key(self) -> str:
        keyed = asdict(self)
        del keyed["backbone_ref"]
        text = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the store


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _details(row: dict) -> str | None:
    details = {k: v for k, v in row.items() if k not in _OWN_FIELDS}
    return json.dumps(details, sort_keys=True, ensure_ascii=False) if details else None


def _path_value(path: str) -> str | bytes:
    """The stored form of a path: absolute text, or its bytes when it is not valid UTF-8."""
    absolute = os.path.abspath(path)
    try:
        absolute.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: a file name in another encoding
        return os.fsencode(absolute)
    return absolute


def _path_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


class ScoreStore:
    """An open score database; use :func:`open_store`. Not shared between threads."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path = path
        self.db = db

    # -- writing ----------------------------------------------------------------------------

    def record(self, row: dict, fp: Fingerprint | None, settings: ScoreSettings, *, scored_at: str | None = None) -> None:
        """Store one result (a scoring row) for ``settings``, replacing the path's earlier one;
        committed before returning."""
        values = {
            "path": _path_value(row["path"]),
            "content_hash": fp.content_hash if fp else None,
            "size": fp.size if fp else None,
            "mtime": fp.mtime if fp else None,
            "settings_key": settings.key,
            "method": settings.method,
            "checkpoint_sha256": settings.checkpoint_sha256,
            "backbone_identity": settings.backbone_identity,
            "seed": settings.seed,
            "resolution": settings.resolution,
            "dtype": settings.dtype,
            "diqa_version": settings.diqa_version,
            "score": row.get("score"),
            "raw_score": row.get("raw_score"),
            "status": row["status"],
            "error": row.get("error"),
            "seconds": row.get("seconds"),
            "scored_at": scored_at or _now(),
            "map": row.get("map"),
            "details": _details(row),
        }
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(f"INSERT OR REPLACE INTO scores ({names}) VALUES ({marks})", tuple(values.values()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- reading ----------------------------------------------------------------------------

    def lookup(self, fp: Fingerprint, settings: ScoreSettings, path: str) -> dict | None:
        """A stored ``ok`` result for this content and these settings, the path's own first."""
        cursor = self.db.execute(
            "SELECT * FROM scores WHERE content_hash = ? AND settings_key = ? AND status = 'ok' "
            "ORDER BY path = ? DESC, scored_at DESC LIMIT 1",
            (fp.content_hash, settings.key, _path_value(path)),
        )
        found = cursor.fetchone()
        return self._row(found) if found is not None else None

    @staticmethod
    def _selection(method: str | None, checkpoint: str | None) -> tuple[str, list[Any]]:
        """SQL condition for a method and a head (``checkpoint``: a SHA-256 or a prefix of one)."""
        conditions, args = [], []
        if method:
            conditions.append("method = ?")
            args.append(method)
        if checkpoint:
            conditions.append("checkpoint_sha256 LIKE ?")
            args.append(checkpoint.lower() + "%")
        return (" AND ".join(conditions) or "1"), args

    def rows(self, *, method: str | None = None, checkpoint: str | None = None) -> Iterator[dict]:
        """Every stored row of the selection (all settings), by path then method."""
        where, args = self._selection(method, checkpoint)
        for found in self.db.execute(f"SELECT * FROM scores WHERE {where} ORDER BY path, method, scored_at", args):
            yield self._row(found)

    def methods(self) -> list[str]:
        return [m for (m,) in self.db.execute("SELECT DISTINCT method FROM scores ORDER BY method")]

    def heads(self, *, method: str | None = None, checkpoint: str | None = None) -> list[tuple[str, str]]:
        """The (method, checkpoint SHA-256) pairs of the selection: each is one score scale."""
        where, args = self._selection(method, checkpoint)
        query = f"SELECT DISTINCT method, checkpoint_sha256 FROM scores WHERE {where} ORDER BY method, checkpoint_sha256"
        return [(m, c) for m, c in self.db.execute(query, args)]

    def best(self, *, method: str, checkpoint: str | None = None, min_score: float | None = None,
             max_score: float | None = None) -> list[dict]:
        """The latest ``ok`` result of each path for ``method`` (and head ``checkpoint``, a SHA-256
        prefix) whose score lies in [min_score, max_score], best first."""
        where, args = self._selection(method, checkpoint)
        query = f"""
            SELECT * FROM (
                SELECT *, ROW_NUMBER() OVER (PARTITION BY path ORDER BY scored_at DESC, id DESC) AS latest
                FROM scores WHERE {where} AND status = 'ok'
            ) WHERE latest = 1
        """
        if min_score is not None:
            query += " AND score >= ?"
            args.append(min_score)
        if max_score is not None:
            query += " AND score <= ?"
            args.append(max_score)
        query += " ORDER BY score DESC, path"
        return [self._row(found) for found in self.db.execute(query, args)]

    def stats(self, *, method: str | None = None, checkpoint: str | None = None) -> dict[str, Any]:
        """Counts, the score distribution per head (method and checkpoint: one scale each), and
        failures by reason, for the selection."""
        import statistics

        db = self.db
        where, args = self._selection(method, checkpoint)
        total, ok, failed, paths = db.execute(
            f"SELECT COUNT(*), SUM(status = 'ok'), SUM(status = 'error'), COUNT(DISTINCT path) FROM scores WHERE {where}",
            args,
        ).fetchone()
        per_method = []
        for head_method, head_checkpoint in self.heads(method=method, checkpoint=checkpoint):
            head = (head_method, head_checkpoint)
            scores = [s for (s,) in db.execute(
                "SELECT score FROM scores WHERE method = ? AND checkpoint_sha256 = ? AND status = 'ok' ORDER BY score", head
            )]
            errors = db.execute(
                "SELECT COUNT(*) FROM scores WHERE method = ? AND checkpoint_sha256 = ? AND status = 'error'", head
            ).fetchone()[0]
            entry: dict[str, Any] = {"method": head_method, "checkpoint_sha256": head_checkpoint, "ok": len(scores),
                                     "errors": errors}
            if scores:
                quartiles = statistics.quantiles(scores, n=4, method="inclusive") if len(scores) > 1 else [scores[0]] * 3
                entry.update(
                    min=scores[0], q1=quartiles[0], median=quartiles[1], q3=quartiles[2], max=scores[-1],
                    mean=statistics.fmean(scores), std=statistics.pstdev(scores),
                )
            per_method.append(entry)
        failures = [
            {"error": error, "count": count}
            for error, count in db.execute(
                f"SELECT error, COUNT(*) AS n FROM scores WHERE {where} AND status = 'error' GROUP BY error "
                "ORDER BY n DESC, error",
                args,
            )
        ]
        return {
            "database": str(self.path),
            "rows": total,
            "ok": ok or 0,
            "errors": failed or 0,
            "paths": paths,
            "methods": per_method,
            "failures": failures,
        }

    @staticmethod
    def _row(found: sqlite3.Row) -> dict:
        row = {k: found[k] for k in STORE_COLUMNS}
        row["path"] = _path_from_db(row["path"])
        row["details"] = json.loads(found["details"]) if found["details"] else {}
        return row

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ScoreStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _use_wal(db: sqlite3.Connection) -> None:
    if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        db.execute("PRAGMA journal_mode = WAL")


def _when_unlocked(step: Callable[[], object]) -> None:
    """Run ``step``, retrying while SQLite reports the database locked, up to BUSY_TIMEOUT_S.

    The busy timeout covers ordinary lock waits, but SQLite returns SQLITE_BUSY at once, without
    waiting, where waiting could deadlock: switching a new file to WAL while another process
    opens it, or a read lock that cannot be upgraded. Two processes creating one database
    together hit exactly that; the loser retries after the winner's short transaction."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.01
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            locked = "locked" in str(exc) or "busy" in str(exc)
            if not locked or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def open_store(path: str | os.PathLike, *, create: bool = True) -> ScoreStore:
    """Open (``create``: or create) the score database at ``path`` and bring its schema up to
    date. A missing file without ``create``, a folder, or a file that is not SQLite is a usage
    error naming the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--db {str(path)!r} is a folder; name a file such as scores.sqlite")
    if not path.exists() and not create:
        raise UsageError(f"{str(path)!r} does not exist; create it with `diqa score … --db {path}`")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE), so a writer
        # takes the lock up front and the busy timeout applies, instead of failing on upgrade.
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot open score database {str(path)!r}: {exc}") from None
    db.row_factory = sqlite3.Row
    try:
        _when_unlocked(lambda: _use_wal(db))
        # In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of diqa loses
        # nothing committed, only a power cut can lose the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        _when_unlocked(lambda: migrate(db))
    except sqlite3.DatabaseError as exc:
        db.close()
        raise UsageError(f"{str(path)!r} is not a diqa score database ({exc})") from None
    except BaseException:
        db.close()
        raise
    return ScoreStore(path, db)


# --------------------------------------------------------------------------- incremental scoring


@dataclass
class _Entry:
    item: Any
    fp: Fingerprint | None
    row: dict | None  # the output row: reused at planning time, else filled in from the scorer
    stored: dict | None = None  # the stored result it reuses


class ReuseRun:
    """Rows for ``items`` in input order: stored results where the content and settings match,
    the ``scorer``'s rows for the rest, each new row recorded in ``store`` as it comes.

    ``scorer`` has ``settings() -> ScoreSettings`` and ``score(items) -> rows in input order``
    (``diqa_cli.engines``). Files are hashed ``hash_workers`` at a time ahead of use; only the
    files that need scoring are handed to the scorer, lazily, so its own batching and prefetch
    work as usual and rows stream out as soon as everything before them is done. Every row gets
    ``cached`` (True when reused). After iteration, ``reused`` and ``scored`` count the rows.
    ``complete(row) -> bool``, when given, finishes a reused row before it is yielded (``diqa score
    --maps`` writes its quality map); a row it changed is recorded again, keeping its score.
    """

    def __init__(self, items: Iterable, scorer, store: ScoreStore, *, hash_workers: int = 2, prefetch: int = 64,
                 complete: Callable[[dict], bool] | None = None):
        self.items = items
        self.scorer = scorer
        self.store = store
        self.hash_workers = max(1, hash_workers)
        self.prefetch = max(1, prefetch)
        self.complete = complete
        self.reused = 0
        self.scored = 0

    def __iter__(self) -> Iterator[dict]:
        settings = self.scorer.settings()
        plan = self._plan(settings)
        order: deque[_Entry] = deque()  # planned, not yet emitted
        handoff: deque[_Entry] = deque()  # planned by the loop below, not yet given to the scorer

        def advance() -> _Entry | None:
            entry = next(plan, None)
            if entry is not None:
                order.append(entry)
            return entry

        def feed() -> Iterator:
            # The scorer pulls from here; pulling plans ahead (hashing, lookups) as far as its
            # prefetch reaches, and skips every reused file.
            while True:
                if handoff:
                    yield handoff.popleft().item
                    continue
                entry = advance()
                if entry is None:
                    return
                if entry.row is None:
                    yield entry.item

        scored = iter(self.scorer.score(feed()))
        try:
            while True:
                if not order:
                    entry = advance()
                    if entry is None:
                        break
                    if entry.row is None:
                        handoff.append(entry)
                head = order[0]
                if head.row is None:
                    # The scorer returns rows in the order it was fed, and every entry before
                    # this one is done, so its next row is this entry's.
                    row = next(scored, None)
                    if row is None or row["path"] != str(_item_path(head.item)):
                        raise RuntimeError(f"scorer returned {row and row['path']!r} for {_item_path(head.item)!r}")
                    row["cached"] = False
                    self.store.record(row, head.fp, settings)
                    head.row = row
                    self.scored += 1
                else:
                    self._keep_reused(head, settings)
                    self.reused += 1
                yield order.popleft().row
        finally:
            close = getattr(scored, "close", None)
            if close is not None:
                close()  # stops the scorer's decoding threads (Ctrl-C, `| head`)
            plan.close()

    def _plan(self, settings: ScoreSettings) -> Iterator[_Entry]:
        pool = ThreadPoolExecutor(max_workers=self.hash_workers, thread_name_prefix="diqa-hash")
        pending: deque = deque()

        def planned(item, future) -> _Entry:
            fp = future.result()
            stored = self.store.lookup(fp, settings, _item_path(item)) if fp is not None else None
            if stored is None:
                return _Entry(item, fp, None)
            row = {
                "path": str(_item_path(item)),
                "score": stored["score"],
                "raw_score": stored["raw_score"],
                "status": "ok",
                "error": None,
                "method": settings.method,
                "backbone": settings.backbone_ref,
                "seconds": stored["seconds"],
                "map": stored["map"],
                **stored["details"],
                "cached": True,
            }
            return _Entry(item, fp, row, stored)

        def hash_item(item) -> Fingerprint | None:
            return None if getattr(item, "error", None) else fingerprint(_item_path(item))

        try:
            for item in self.items:
                pending.append((item, pool.submit(hash_item, item)))
                if len(pending) >= self.prefetch:
                    yield planned(*pending.popleft())
            while pending:
                yield planned(*pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _keep_reused(self, entry: _Entry, settings: ScoreSettings) -> None:
        """A reused result found under another path (a moved or copied file), or under this path
        with another size or mtime, or one that ``complete`` changed, is recorded for this path as
        it is now."""
        stored, fp = entry.stored, entry.fp
        completed = self.complete is not None and self.complete(entry.row)
        same_path = stored["path"] == os.fsdecode(_path_value(entry.row["path"]))
        if same_path and (stored["size"], stored["mtime"]) == (fp.size, fp.mtime) and not completed:
            return
        self.store.record(entry.row, fp, settings, scored_at=stored["scored_at"])


def _item_path(item) -> str:
    return getattr(item, "path", item)
