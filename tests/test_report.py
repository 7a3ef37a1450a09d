"""The HTML report (pks_emu/report.py): the numbers on the page are those of
the result dict, and the page loads whole in a real headless browser."""
from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from pks_emu._core import FAULT_DTYPE_FIELDS, FaultSites  # noqa: E402
from pks_emu.errors import PksEmuError  # noqa: E402
from pks_emu.report import add_arguments, page_matrix, render_html, render_report, run  # noqa: E402


def make_result(n_faults=5000, seed=5, records=3_000_000) -> dict:
    """A schema-2 result as the replay gives it, from a random fault stream."""
    rng = np.random.default_rng(seed)
    f = np.zeros(n_faults, dtype=np.dtype(FAULT_DTYPE_FIELDS))
    f["record"] = np.sort(rng.integers(0, records, n_faults))
    f["pkey"] = rng.choice([3, 3, 3, 5, -1], n_faults)
    f["vector"] = np.where(rng.random(n_faults) < 0.05, 13, 14)
    f["error_code"] = np.where(f["vector"] == 14, np.where(f["pkey"] >= 0, 0x27, 0x7), 0)
    f["pkey"][f["vector"] == 13] = -1
    f["kind"] = rng.choice([0, 1, 1], n_faults)
    f["address"] = 0x4a00000 + rng.zipf(1.5, n_faults).clip(0, 200) * 0x1000 + rng.integers(0, 4096, n_faults)
    ip = (0x401000 + rng.zipf(1.3, n_faults).clip(0, 300) * 16).astype(np.uint64)
    fs = FaultSites()
    fs.add_faults(f, ip)

    class Sym:
        def lookup_many(self, ips):
            return ([f"func{int(i) % 7}+{int(i) % 64:#x}" if int(i) % 3 else None for i in ips],
                    [f"file{int(i) % 5}.c:{int(i) % 100}" if int(i) % 2 else None for i in ips])

    pf = f[f["vector"] == 14]
    codes, counts = np.unique(pf["error_code"], return_counts=True)
    pk = pf[(pf["error_code"] & 0x20) != 0]
    keys, kcounts = np.unique(pk["pkey"], return_counts=True)
    d = {"schema": "pks-emu-replay/2", "api": "v10", "trace": "synthetic <trace> & co", "header": {},
         "records": records, "records_replayed": records, "stopped_early": False, "elapsed_seconds": 1.25,
         "accesses": records, "accesses_per_second": records / 1.25, "record_counts": {"access": records},
         "counters": {"tlb_hits": 123, "tlb_misses": 4}, "per_cpu": [], "kernel": {"context_switches": 0},
         "fault_count": n_faults,
         "faults_by_vector": {"#GP": int((f["vector"] == 13).sum()), "#PF": int(len(pf))},
         "faults_by_error_code": {f"{int(c):#x}": int(n) for c, n in zip(codes, counts)},
         "faults_by_pkey": {str(int(k)): int(n) for k, n in zip(keys, kcounts)},
         "faults": [], "faults_listed": 0, "stale_uses": [], "symbols": ["fake.syms"]}
    d.update(fs.to_dict(Sym(), records=records))
    return d


class Tables(HTMLParser):
    """Every <table id=...> as a list of rows of cell texts; <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id", "")] = a.get("src", "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def num(text: str) -> int:
    return int(text.replace(",", ""))


def test_page_numbers_equal_the_result():
    d = make_result()
    page = render_html(d)
    t = Tables()
    t.feed(page)
    summary = {r[0]: r[1] for r in t.tables["summary"][1:]}
    assert num(summary["faults"]) == d["fault_count"]
    assert num(summary["records"]) == d["records"]
    assert num(summary["distinct sites"]) == d["sites_total"]
    assert num(summary["distinct (page, key)"]) == d["pages_total"]

    sites = t.tables["sites"]
    header, rows = sites[0], sites[1:]
    col = {h: i for i, h in enumerate(header)}
    assert len(rows) == min(100, len(d["sites"]))
    for row, s in zip(rows, d["sites"]):
        assert row[col["ip"]] == s["ip"]
        assert row[col["symbol"]] == (s["symbol"] or "")
        assert row[col["source"]] == (s["source"] or "")
        assert num(row[col["count"]]) == s["count"]
        assert num(row[col["first record"]]) == s["first_record"]
        assert num(row[col["last record"]]) == s["last_record"]
        assert row[col["sample addresses"]].split() == s["sample_addresses"]
        assert row[col["pkey"]] == ("" if s["pkey"] is None else str(s["pkey"]))
    # The sites add up to every fault (the list is complete here).
    assert sum(s["count"] for s in d["sites"]) == d["fault_count"]

    by_code = {r[0]: num(r[2]) for r in t.tables["by-error-code"][1:]}
    assert by_code == d["faults_by_error_code"]
    assert {r[0]: num(r[1]) for r in t.tables["by-pkey"][1:]} == d["faults_by_pkey"]
    assert {r[0]: num(r[1]) for r in t.tables["by-vector"][1:]} == d["faults_by_vector"]
    # Error code x key, from the sites, agrees with the per-code totals.
    cross = t.tables["code-by-key"]
    assert {r[0]: num(r[-1]) for r in cross[1:]} == d["faults_by_error_code"]
    tl = {r[0]: num(r[1]) for r in t.tables["timeline"][1:]}
    want = {("not a PK fault" if k == "other" else f"key {k}"): sum(v) for k, v in d["timeline"]["by_pkey"].items()}
    assert tl == want and sum(tl.values()) == d["fault_count"]
    pages = t.tables["pages"][1:]
    assert [(r[0], num(r[2])) for r in pages] == [(p["page"], p["count"]) for p in d["pages"][:100]]
    # Strings are escaped, and three plots are embedded as PNG data.
    assert "synthetic &lt;trace&gt; &amp; co" in page
    assert set(t.images) == {"plot-timeline", "plot-sites", "plot-pages"}
    for src in t.images.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page     # self-contained


def test_heat_map_matrix():
    pages = [{"page": "0x1000", "pkey": 3, "count": 5}, {"page": "0x1000", "pkey": None, "count": 2},
             {"page": "0x2000", "pkey": 3, "count": 9}, {"page": "0x3000", "pkey": 1, "count": 1}]
    rows, keys, m = page_matrix(pages, top=2)
    assert rows == ["0x1000", "0x2000"] and keys == ["none", "1", "3"]
    assert m == [[2, 0, 5], [0, 0, 9]]


def test_schema1_and_empty_results(tmp_path):
    # A schema-1 result (no sites/timeline/pages) and a run without faults
    # still give a page, with the tables they have.
    d = make_result(n_faults=10)
    for k in ("sites", "sites_total", "timeline", "pages", "pages_total", "pages_dropped", "api", "symbols"):
        d.pop(k)
    d["schema"] = "pks-emu-replay/1"
    page = render_html(d)
    assert "No fault sites" in page and "<img" not in page
    empty = make_result(n_faults=0)
    page = render_html(empty)
    assert "No fault sites" in page and "No page data" in page


def test_cli_run(tmp_path, capsys):
    res = tmp_path / "r.json"
    res.write_text(json.dumps(make_result(n_faults=200)))
    out = tmp_path / "report.html"
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args([str(res), "-o", str(out), "--top", "5"])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(PksEmuError, match="not a pks-emu replay result"):
        run(p.parse_args([str(bad), "-o", str(out)]))
    bad.write_text("{")
    with pytest.raises(PksEmuError, match="not JSON"):
        run(p.parse_args([str(bad), "-o", str(out)]))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_page_loads_in_headless_chromium(tmp_path):
    from PIL import Image
    html_path = tmp_path / "report.html"
    render_report(make_result(), html_path)
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    url = html_path.as_uri()
    # The DOM after the load event: the page's own check script ran, every
    # image decoded, no script error.
    dom = subprocess.run(common + ["--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    root = re.search(r"<html[^>]*>", dom.stdout)
    assert root, dom.stdout[:500]
    assert 'data-loaded="1"' in root.group(0), root.group(0)
    assert 'data-images="3/3"' in root.group(0), root.group(0)
    assert "data-js-error" not in root.group(0)
    assert "Top 20 fault sites" not in dom.stdout     # plot text is in the images, not the DOM
    assert "Fault sites</h2>" in dom.stdout
    # A screenshot: not blank (many colours: plots, text, table borders).
    shot = tmp_path / "shot.png"
    proc = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2400",
                                    "--hide-scrollbars", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert img.size == (1280, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, len(colours or [])
    # Not mostly one colour either: the white background covers < 95%.
    top = max(colours)[0]
    assert top < 0.95 * img.size[0] * img.size[1]
