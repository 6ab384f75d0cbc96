"""`diqa report`: one self-contained HTML page (and a PNG contact sheet) from stored scores.

Most tests build rows by hand (JSONL, as `diqa score --format jsonl` writes them) over small real
images; one scores real images with the tiny DP-IQA head to check that the SQLite, CSV and JSONL
sources of the same run give the same report. The page is checked with the standard library's
HTML parser plus a strict checker (every non-void element closed in order, no duplicate ids or
attributes), not html5lib, which diqa does not otherwise need.
"""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

# --- a strict reading of the page ------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def by_id(self, ident: str) -> Node:
        (found,) = [n for n in self.iter() if n.attrs.get("id") == ident]
        return found


class StrictPage(HTMLParser):
    """Builds a tree and fails on what browsers would silently repair: an end tag that does not
    close the innermost open element, an element left open, a repeated attribute or id."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root
        self.doctype = None
        self.ids: set[str] = set()
        self.feed(text)
        self.close()
        assert self.current is self.root, f"<{self.current.tag}> is never closed"

    def handle_decl(self, decl):
        self.doctype = decl

    def _open(self, tag, attrs) -> Node:
        names = [name for name, _ in attrs]
        assert len(names) == len(set(names)), f"<{tag}> repeats an attribute: {names}"
        attrs = {name: value or "" for name, value in attrs}
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"id {attrs['id']!r} is used twice"
            self.ids.add(attrs["id"])
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        return node

    def handle_starttag(self, tag, attrs):
        node = self._open(tag, attrs)
        if tag not in _VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):  # <line .../> inside SVG
        self._open(tag, attrs)

    def handle_endtag(self, tag):
        assert tag not in _VOID, f"</{tag}> closes a void element"
        assert self.current.tag == tag, f"</{tag}> while <{self.current.tag}> is open"
        self.current = self.current.parent

    def handle_data(self, data):
        self.current.children.append(data)


def read_page(path: Path) -> Node:
    page = StrictPage(path.read_text(encoding="utf-8"))
    assert page.doctype is not None and page.doctype.lower() == "doctype html"
    return page.root


def table_rows(root: Node) -> list[Node]:
    return root.by_id("rows").find_all("tr", cls="row")


def data_uris(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", text)]


# --- inputs ----------------------------------------------------------------------------------------

HOSTILE_ERROR = '<img src=x onerror="alert(1)"> & "quotes"'


@pytest.fixture
def photos(tmp_path, tiny_images) -> list[Path]:
    """Six readable images (JPEG and PNG), one of them in a folder named like a script tag."""
    folder = tmp_path / "photos"
    hostile = folder / "<script>alert(1)<"  # with the file name below: <script>alert(1)</script>.png
    hostile.mkdir(parents=True)
    paths = []
    for i, image in enumerate(tiny_images(6, size=160)):
        path = (hostile / "script>.png") if i == 5 else folder / f"p{i}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def image_rows(photos: list[Path], tmp_path: Path) -> list[dict]:
    """Two methods over the same photos (two groups), plus error rows in each."""
    rows = []
    for method, scale, checkpoint in (("dpiqa", 1.0, "heads/dpiqa.safetensors"), ("genziqa", 10.0, "heads/genziqa.safetensors")):
        for i, photo in enumerate(photos):
            score = scale * (i + 1) / 10
            rows.append({"path": str(photo), "score": score, "raw_score": score, "status": "ok", "error": None,
                         "method": method, "backbone": "sd15", "checkpoint": checkpoint, "seconds": 0.01})
        rows.append({"path": str(tmp_path / "broken.jpg"), "score": None, "raw_score": None, "status": "error",
                     "error": HOSTILE_ERROR, "method": method, "backbone": "sd15", "checkpoint": checkpoint,
                     "seconds": None})
    return rows


@pytest.fixture
def jsonl(photos, tmp_path) -> Path:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    return write_jsonl(tmp_path / "scores.jsonl", image_rows(photos, tmp_path))


def report(run_main, *args):
    code, out, err = run_main(["report", *map(str, args)])
    assert out == "", "the report command prints nothing on stdout"
    return code, err


# --- the page --------------------------------------------------------------------------------------


def test_page_parses_strictly_and_holds_every_row_with_its_group_summary(jsonl, tmp_path, run_main):
    out = tmp_path / "report.html"
    code, err = report(run_main, jsonl, "-o", out)
    assert code == 0
    assert str(out) in err and "14 rows in 2 groups" in err
    root = read_page(out)

    rows = table_rows(root)
    assert len(rows) == 14  # one per input row, error rows included
    assert [r.attrs["data-status"] for r in rows].count("error") == 2
    errors = root.by_id("errors-table").find_all("tr", cls="error-row")
    assert len(errors) == 2 and all(HOSTILE_ERROR in e.text for e in errors)

    for ident, label, scale in (("g1", "dpiqa", 1.0), ("g2", "genziqa", 10.0)):
        section = root.by_id(ident)
        assert label in section.find_all("h3")[0].text
        assert " ".join(section.find_all("p", cls="counts")[0].text.split()) == "7 rows: 6 scored, 1 failed"
        quantiles = dict((tr.find_all("th")[0].text, float(tr.find_all("td")[0].text))
                         for tr in section.find_all("table", cls="quantiles")[0].find_all("tr"))
        scores = [scale * (i + 1) / 10 for i in range(6)]
        assert quantiles["min"] == pytest.approx(min(scores), rel=1e-5)
        assert quantiles["median"] == pytest.approx(statistics.median(scores), rel=1e-5)
        assert quantiles["max"] == pytest.approx(max(scores), rel=1e-5)
        bars = section.find_all("rect", cls="bar")
        assert sum(int(b.find_all("title")[0].text.rsplit(": ", 1)[1]) for b in bars) == 6  # histogram counts
        settings = {tr.find_all("th")[0].text: tr.find_all("td")[0].attrs["title"]
                    for tr in section.find_all("table", cls="settings")[0].find_all("tr")}
        assert settings["method"] == label and settings["backbone"] == "sd15"

    # Best and worst: the highest and the lowest scores of each group, never across groups.
    best = root.find_all("div", cls="grid")[0].find_all("b")
    assert [float(b.text) for b in best[:2]] == [0.6, 0.5]
    # The script only sorts and filters: everything is readable without it.
    assert len(root.find_all("script")) == 1
    assert root.by_id("controls").attrs.get("hidden") is not None


def test_embedded_thumbnails_decode_and_each_file_is_stored_once(jsonl, tmp_path, run_main):
    out = tmp_path / "report.html"
    code, _ = report(run_main, jsonl, "-o", out)
    assert code == 0
    text = out.read_text(encoding="utf-8")
    sizes = []
    for data in data_uris(text):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == "JPEG"
            sizes.append(max(image.size))
    # Six readable files named by 12 ok rows across two groups: each stored once for the table
    # (64 px) and once for the best/worst grid (128 px), however many rows and groups show it.
    assert sorted(sizes) == [64] * 6 + [128] * 6
    root = read_page(out)
    ok_rows = [r for r in table_rows(root) if r.attrs["data-status"] == "ok"]
    assert all(r.find_all("span", cls="th") for r in ok_rows)
    # The broken file gets a placeholder, not a failure.
    error_rows = [r for r in table_rows(root) if r.attrs["data-status"] == "error"]
    assert all(r.find_all("span", cls="ph") for r in error_rows)


def test_linked_thumbnails_sit_beside_the_report_and_decode(jsonl, tmp_path, run_main):
    out = tmp_path / "site" / "my report.html"
    out.parent.mkdir()
    code, err = report(run_main, jsonl, "-o", out, "--thumbs", "linked")
    assert code == 0 and "my report_thumbs" in err
    text = out.read_text(encoding="utf-8")
    assert not data_uris(text)
    sources = [img.attrs["src"] for img in read_page(out).find_all("img")]
    # the 12 ok table rows, plus each group's grid (6 ok rows each: all best, none left for worst)
    assert len(sources) == 12 + 2 * 6
    from urllib.parse import unquote

    for src in set(sources):
        assert not src.startswith(("/", "file:")), "linked relatively, so the folder can move with the report"
        with Image.open(out.parent / unquote(src)) as image:
            image.load()


def test_page_fetches_nothing_from_the_network(jsonl, tmp_path, run_main):
    out = tmp_path / "report.html"
    assert report(run_main, jsonl, "-o", out)[0] == 0
    root = read_page(out)
    for node in root.iter():
        for name in ("src", "href", "action", "data", "poster"):
            value = node.attrs.get(name, "")
            assert not re.match(r"\s*(https?:)?//", value), f"<{node.tag} {name}={value!r}>"
    style = root.find_all("style")[0].text
    assert "@import" not in style and not re.search(r"url\(\s*[\"']?(https?:)?//", style)
    csp = [m.attrs["content"] for m in root.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]


def test_paths_and_errors_are_text_never_markup(jsonl, photos, tmp_path, run_main):
    out = tmp_path / "report.html"
    assert report(run_main, jsonl, "-o", out)[0] == 0
    root = read_page(out)
    assert len(root.find_all("script")) == 1  # ours; the file named <script>… is not one
    assert not [n for n in root.iter() if "onerror" in n.attrs]
    hostile = str(photos[5])
    assert "<script>alert(1)</script>" in hostile
    shown = [r.find_all("td", cls="path")[0].text for r in table_rows(root)]
    assert shown.count(hostile) == 2  # its path, read back as text, in each group
    assert [r for r in table_rows(root) if hostile in r.text][0].find_all("span", cls="th")  # and its thumbnail


def test_custom_title_and_a_moved_file_gets_a_placeholder(jsonl, photos, tmp_path, run_main):
    photos[0].unlink()
    out = tmp_path / "report.html"
    code, err = report(run_main, jsonl, "-o", out, "--title", "Holiday <photos>")
    assert code == 0 and "2 scored files have no preview" in err
    root = read_page(out)
    assert root.find_all("title")[0].text == "Holiday <photos>" == root.find_all("h1")[0].text
    moved = [r for r in table_rows(root) if str(photos[0]) in r.text]
    assert len(moved) == 2 and all(r.find_all("span", cls="ph") for r in moved)


def test_videos_get_a_first_frame_and_a_per_frame_curve(tmp_path, run_main):
    av = pytest.importorskip("av")
    import numpy as np

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = np.full((32, 32, 3), i * 30, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    per_frame = [{"time": t / 4, "score": 2.0 + t / 10} for t in range(4)]
    rows = [
        {"path": str(clip), "score": 2.1, "raw_score": 2.1, "status": "ok", "error": None, "frames_sampled": 4,
         "frames_decoded": 4, "frames_lost": 0, "decoder": "pyav", "duration": 1.0, "clips": 1, "method": "genzvqa",
         "per_frame": per_frame},
        {"path": str(tmp_path / "gone.mp4"), "score": None, "raw_score": None, "status": "error",
         "error": "no such file", "frames_sampled": None, "method": "genzvqa", "per_frame": None},
    ]
    out = tmp_path / "videos.html"
    assert report(run_main, write_jsonl(tmp_path / "videos.jsonl", rows), "-o", out)[0] == 0
    root = read_page(out)
    (curve,) = root.by_id("per-frame").parent.find_all("polyline", cls="curve")
    assert len(curve.attrs["points"].split()) == 4
    first_frames = data_uris(out.read_text(encoding="utf-8"))
    assert len(first_frames) == 2  # the table's and the grid's (a 32 px frame is not enlarged)
    for data in first_frames:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (32, 32)
    assert "4/4" in table_rows(root)[0].text


def test_quality_maps_are_shown_where_a_row_has_one(jsonl, photos, tmp_path, run_main):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    qmap = tmp_path / "p0.map.png"
    Image.new("L", (48, 48), 128).save(qmap)
    rows[0]["map"] = str(qmap)
    out = tmp_path / "maps.html"
    assert report(run_main, write_jsonl(tmp_path / "maps.jsonl", rows), "-o", out)[0] == 0
    root = read_page(out)
    first = table_rows(root)[0]
    assert str(qmap) in first.text and len(first.find_all("span", cls="th")) == 2  # the image and its map
    assert len(data_uris(out.read_text(encoding="utf-8"))) == 6 + 6 + 1  # table, grid, the map


# --- sources ---------------------------------------------------------------------------------------


def test_sqlite_csv_and_jsonl_of_one_real_run_give_the_same_report(dpiqa_head, photos, tmp_path, model_home, run_main):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    inputs = [str(p) for p in photos[:3]] + [str(tmp_path / "broken.jpg")]
    db = tmp_path / "scores.sqlite"
    args = ["score", "--checkpoint", str(dpiqa_head), "--device", "cpu", "--dtype", "fp32", "--db", str(db)]
    sources = {"sqlite": db}
    for fmt in ("jsonl", "csv"):
        code, out, _ = run_main([*args, "-f", fmt, *inputs], home=model_home)
        assert code == 3
        sources[fmt] = tmp_path / f"scores.{fmt}"
        sources[fmt].write_text(out)
    pages = {}
    for kind, source in sources.items():
        out = tmp_path / f"{kind}.html"
        code, err = report(run_main, source, "-o", out)
        assert code == 0, err
        pages[kind] = root = read_page(out)
        rows = table_rows(root)
        assert len(rows) == 4 and [r.attrs["data-status"] for r in rows].count("error") == 1
    scores = {kind: sorted(float(r.find_all("td")[3].attrs["data-v"]) for r in table_rows(root)
                           if r.attrs["data-status"] == "ok") for kind, root in pages.items()}
    assert scores["sqlite"] == scores["jsonl"] == scores["csv"]
    # The database records the settings; the JSONL the method and checkpoint; the CSV neither.
    def settings(root):
        return {tr.find_all("th")[0].text for tr in root.by_id("g1").find_all("table", cls="settings")[0].find_all("tr")
                if tr.find_all("th")}
    assert {"method", "checkpoint sha256", "seed", "resolution", "dtype", "diqa version"} <= settings(pages["sqlite"])
    assert {"method", "checkpoint"} <= settings(pages["jsonl"])
    assert "not recorded" in pages["csv"].by_id("g1").text


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "is not a diqa score database, CSV or JSONL file"),
        (b"name,value\nx,1\n", "no 'path' column"),
        (b'{"path": "a.png", "score": 1}\n{oops\n', "line 2 is not JSON"),
    ],
)
def test_a_source_of_another_kind_is_refused_in_one_line(content, needle, tmp_path, run_main):
    source = tmp_path / "scores.odd"
    source.write_bytes(content)
    code, err = report(run_main, source, "-o", tmp_path / "r.html")
    assert code == 2
    assert err.count("\n") == 1 and needle in err and str(source) in err
    assert not (tmp_path / "r.html").exists()


# --- contact sheet and overwriting -----------------------------------------------------------------


def test_png_contact_sheet_has_a_best_and_a_worst_line_per_group(jsonl, tmp_path, run_main):
    from diqa_cli.report.sheet import GAP, LABEL_W, TITLE_H, cell_size

    sheet = tmp_path / "sheet.png"
    code, err = report(run_main, jsonl, "--png", sheet, "--top", "2", "--thumb-size", "64")
    assert code == 0 and str(sheet) in err
    assert not (tmp_path / "report.html").exists() and not Path("report.html").exists()  # only the PNG was asked for
    cell_w, cell_h = cell_size(64)
    with Image.open(sheet) as image:
        image.load()
        assert image.format == "PNG"
        # two groups, each a title strip and a best and a worst line of two cells
        assert image.size == (GAP + LABEL_W + 2 * cell_w, GAP + 2 * TITLE_H + 4 * cell_h)
        first_thumb = image.crop((GAP + LABEL_W, GAP + TITLE_H, GAP + LABEL_W + 64, GAP + TITLE_H + 64))
        assert len(first_thumb.getcolors(64 * 64)) > 10  # a photo is drawn there, not blank paper


def test_existing_outputs_are_kept_unless_overwrite(jsonl, tmp_path, run_main):
    out, sheet = tmp_path / "report.html", tmp_path / "sheet.png"
    out.write_text("keep me")
    code, err = report(run_main, jsonl, "-o", out, "--png", sheet)
    assert code == 2 and err.count("\n") == 1 and str(out) in err and "--overwrite" in err
    assert out.read_text() == "keep me" and not sheet.exists()

    code, _ = report(run_main, jsonl, "-o", out, "--png", sheet, "--overwrite")
    assert code == 0 and len(table_rows(read_page(out))) == 14 and sheet.exists()

    code, err = report(run_main, jsonl, "-o", jsonl, "--overwrite")
    assert code == 2 and "source" in err and jsonl.read_text().startswith("{")


def test_a_database_path_in_another_encoding_is_shown_and_previewed(photos, tmp_path, run_main):
    import os

    from diqa_cli.store import ScoreSettings, open_store

    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # Latin-1 name: not UTF-8
    with open(odd, "wb") as stream:
        stream.write(photos[0].read_bytes())
    settings = ScoreSettings(method="dpiqa", checkpoint_sha256="ab" * 32, backbone_identity="cd" * 32, seed=0,
                             resolution=512, dtype="fp32", diqa_version="0.1.0", head={})
    db = tmp_path / "scores.sqlite"
    with open_store(db) as store:
        store.record({"path": os.fsdecode(odd), "score": 0.5, "raw_score": 0.5, "status": "ok"}, None, settings)
    out = tmp_path / "report.html"
    code, err = report(run_main, db, "-o", out, "--png", tmp_path / "sheet.png")
    assert code == 0, err
    (row,) = table_rows(read_page(out))
    assert "caf\ufffd.png" in row.text and row.find_all("span", cls="th")


def test_an_sqlite_file_of_another_program_is_refused_and_left_unchanged(tmp_path, run_main):
    import sqlite3

    other = tmp_path / "photos.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE albums (name TEXT)")
    before = other.read_bytes()
    code, err = report(run_main, other, "-o", tmp_path / "r.html")
    assert code == 2 and "without diqa's tables" in err and str(other) in err
    assert other.read_bytes() == before
