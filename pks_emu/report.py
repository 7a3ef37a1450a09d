"""``pks-emu report RESULT.json -o report.html``: one self-contained HTML
page about a replay (docs/report.md).

The page holds the plots as embedded PNG images (matplotlib, Agg backend:
no display needed) and the summary tables; it loads nothing from anywhere.
Plots: faults over the run by protection key (the schema-2 ``timeline``),
the top sites as a horizontal bar chart labelled by symbol (or hex IP), and
pages x keys as a heat map. Tables: the counters, faults by vector, #PF
error code and key, the top sites (symbol, source, count, first and last
record, sample addresses) and the top pages. A schema-1 result (no sites)
gets the tables it has.

matplotlib is the ``report`` extra: ``pip install 'pks-emu[report]'``.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys

from .errors import PksEmuError

#: Sites in the bar chart and pages in the heat map.
TOP_SITES = 20
TOP_PAGES = 40
#: Rows of the sites and pages tables.
TABLE_ROWS = 100

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eef; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code, td.mono { font-family: monospace; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #666; font-size: 0.85em; }
"""

# Runs in the browser only to let a test (or a person) see that the page
# loaded whole: every image decoded, no script error.
_CHECK_JS = """
window.addEventListener("error", function (e) {
  document.documentElement.setAttribute("data-js-error", String(e.message));
});
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.documentElement.setAttribute("data-images", ok + "/" + imgs.length);
  document.documentElement.setAttribute("data-loaded", "1");
});
"""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _key_name(k) -> str:
    return "no key" if k is None else f"key {k}"


def site_label(s: dict) -> str:
    """A site's name in the plots: its symbol, else its hex IP."""
    return s.get("symbol") or s.get("ip") or "?"


def plot_timeline(timeline: dict):
    """Faults per bucket of records, one line per key ('other': non-PK)."""
    by = timeline.get("by_pkey") or {}
    width = int(timeline.get("bucket_records") or 1)
    fig = _figure(10, 3.6)
    ax = fig.add_subplot()
    order = sorted(by, key=lambda k: (k == "other", int(k) if k.isdigit() else 99))
    for k in order:
        counts = by[k]
        xs = [i * width for i in range(len(counts) + 1)]
        ax.stairs(counts, xs, label="not a PK fault" if k == "other" else f"key {k}", linewidth=1.4)
    ax.set_xlabel(f"record index (buckets of {width:,} records)")
    ax.set_ylabel("faults per bucket")
    ax.set_title("Faults over the run, by protection key")
    if order:
        ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def plot_sites(sites: list[dict], top: int = TOP_SITES):
    """The top sites by count as horizontal bars, coloured by key."""
    shown = sites[:top]
    fig = _figure(10, 0.32 * max(len(shown), 3) + 1.2)
    ax = fig.add_subplot()
    keys = sorted({s.get("pkey") for s in shown}, key=lambda k: -1 if k is None else k)
    cmap = _cmap("tab10")
    colour = {k: cmap(i % 10) for i, k in enumerate(keys)}
    labels = [f"{site_label(s)}  ({s.get('kind', '')}, {_key_name(s.get('pkey'))})" for s in shown]
    ys = list(range(len(shown)))
    ax.barh(ys, [s["count"] for s in shown], color=[colour[s.get("pkey")] for s in shown])
    ax.set_yticks(ys, labels, fontsize="small", family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel("faults")
    ax.set_title(f"Top {len(shown)} fault sites")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _cmap(name: str):
    import matplotlib
    return matplotlib.colormaps[name]


def page_matrix(pages: list[dict], top: int = TOP_PAGES):
    """(page labels, key labels, counts[page][key]) of the ``top`` pages
    with the most faults (all keys), in address order."""
    totals: dict[str, int] = {}
    for p in pages:
        totals[p["page"]] = totals.get(p["page"], 0) + p["count"]
    rows = sorted(totals, key=lambda pg: (-totals[pg], int(pg, 16)))[:top]
    rows.sort(key=lambda pg: int(pg, 16))       # shown in address order
    keys = sorted({p["pkey"] for p in pages if p["page"] in totals},
                  key=lambda k: -1 if k is None else k)
    ri = {pg: i for i, pg in enumerate(rows)}
    ki = {k: j for j, k in enumerate(keys)}
    m = [[0] * len(keys) for _ in rows]
    for p in pages:
        if p["page"] in ri:
            m[ri[p["page"]]][ki[p["pkey"]]] += p["count"]
    return rows, ["none" if k is None else str(k) for k in keys], m


def plot_pages(pages: list[dict], top: int = TOP_PAGES):
    """Pages x keys heat map (logarithmic colour scale)."""
    import numpy as np
    from matplotlib.colors import LogNorm
    rows, keys, m = page_matrix(pages, top)
    a = np.ma.masked_equal(np.array(m, dtype=float), 0)
    fig = _figure(max(4.0, 1.0 + 0.6 * len(keys)) + 2.5, 0.25 * max(len(rows), 4) + 1.5)
    ax = fig.add_subplot()
    im = ax.imshow(a, aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=LogNorm(vmin=1, vmax=max(1.0, float(a.max()))))
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yticks(range(len(rows)), rows, fontsize="small", family="monospace")
    ax.set_xlabel("protection key")
    ax.set_title(f"Faults by page and key (top {len(rows)} pages)")
    fig.colorbar(im, ax=ax, label="faults")
    return fig


def _table(header: list[str], rows: list[list], *, table_id: str, numeric=()) -> str:
    out = [f'<table id="{table_id}"><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>")
        for h, v in zip(header, r):
            cls = ' class="n"' if h in numeric else ""
            text = "" if v is None else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
            out.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv(pairs: list[tuple[str, object]], table_id: str) -> str:
    return _table(["what", "value"], [[k, v] for k, v in pairs], table_id=table_id, numeric=("value",))


def error_key_crosstab(sites: list[dict]) -> tuple[list[str], list[list]]:
    """#PF faults by error code (rows) and key (columns), from the sites."""
    keys = sorted({s.get("pkey") for s in sites if s.get("vector") == "#PF"},
                  key=lambda k: -1 if k is None else k)
    codes: dict[tuple[int, str], dict] = {}
    for s in sites:
        if s.get("vector") != "#PF":
            continue
        row = codes.setdefault((s["error_code"], s.get("error_code_bits", "")), {})
        row[s.get("pkey")] = row.get(s.get("pkey"), 0) + s["count"]
    header = ["error code", "bits"] + [_key_name(k) for k in keys] + ["total"]
    rows = [[f"{c:#x}", bits] + [row.get(k, 0) for k in keys] + [sum(row.values())]
            for (c, bits), row in sorted(codes.items())]
    return header, rows


def render_html(result: dict, *, top_sites: int = TOP_SITES, top_pages: int = TOP_PAGES,
                title: str | None = None) -> str:
    """The report page for a replay result dict (``ReplayResult.to_dict()``)."""
    sites = result.get("sites") or []
    pages = result.get("pages") or []
    timeline = result.get("timeline") or {}
    trace = str(result.get("trace", "?"))
    title = title or f"pks-emu replay report: {os.path.basename(trace)}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style><script>{_CHECK_JS}</script></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">trace <code>{html.escape(trace)}</code>, schema '
             f'<code>{html.escape(str(result.get("schema", "?")))}</code>'
             + (f', api <code>{html.escape(str(result["api"]))}</code>' if result.get("api") else "") + "</p>"]

    elapsed = result.get("elapsed_seconds")
    summary = [("records", result.get("records")), ("records replayed", result.get("records_replayed")),
               ("stopped early", "yes" if result.get("stopped_early") else "no"),
               ("accesses", result.get("accesses")),
               ("time (s)", f"{elapsed:.3f}" if isinstance(elapsed, (int, float)) else None),
               ("faults", result.get("fault_count")), ("distinct sites", result.get("sites_total")),
               ("distinct (page, key)", result.get("pages_total"))]
    if result.get("pages_dropped"):
        summary.append(("faults not in the page table (full)", result["pages_dropped"]))
    parts.append("<h2>Summary</h2>" + _kv([(k, v) for k, v in summary if v is not None], "summary"))

    parts.append("<h2>Faults over the run</h2>")
    if timeline.get("by_pkey"):
        parts.append(f'<img id="plot-timeline" alt="faults over the run by key" '
                     f'src="data:image/png;base64,{_png(plot_timeline(timeline))}">')
        tl_rows = [[("not a PK fault" if k == "other" else f"key {k}"), sum(v), max(v)]
                   for k, v in sorted(timeline["by_pkey"].items(), key=lambda kv: (kv[0] == "other", kv[0]))]
        parts.append(_table(["row", "faults", "most in one bucket"], tl_rows, table_id="timeline",
                            numeric=("faults", "most in one bucket")))
    else:
        parts.append('<p class="note">No timeline in this result (no faults, or a schema-1 result).</p>')

    parts.append("<h2>Fault sites</h2>")
    if sites:
        parts.append(f'<img id="plot-sites" alt="top fault sites" '
                     f'src="data:image/png;base64,{_png(plot_sites(sites, top_sites))}">')
        shown = sites[:TABLE_ROWS]
        rows = [[i + 1, s.get("ip"), s.get("symbol"), s.get("source"), s.get("vector"), s.get("kind"),
                 s.get("pkey"), f"{s['error_code']:#x} {s.get('error_code_bits', '')}".strip(), s["count"],
                 s.get("first_record"), s.get("last_record"), " ".join(s.get("sample_addresses", []))]
                for i, s in enumerate(shown)]
        parts.append(_table(["#", "ip", "symbol", "source", "vector", "kind", "pkey", "error code", "count",
                             "first record", "last record", "sample addresses"], rows, table_id="sites",
                            numeric=("#", "count", "first record", "last record", "pkey")))
        total = result.get("sites_total", len(sites))
        if total > len(shown):
            parts.append(f'<p class="note">{len(shown)} of {total:,} sites shown.</p>')
    else:
        parts.append('<p class="note">No fault sites in this result.</p>')

    parts.append("<h2>Faults by vector, error code and key</h2>")
    by_vec = result.get("faults_by_vector") or {}
    parts.append(_table(["vector", "faults"], [[k, v] for k, v in by_vec.items()], table_id="by-vector",
                        numeric=("faults",)))
    by_code = result.get("faults_by_error_code") or {}
    if by_code:
        from .constants import pf_error_code_str
        parts.append(_table(["#PF error code", "bits", "faults"],
                            [[k, pf_error_code_str(int(k, 16)), v] for k, v in by_code.items()],
                            table_id="by-error-code", numeric=("faults",)))
    by_key = result.get("faults_by_pkey") or {}
    if by_key:
        parts.append(_table(["key", "PK faults"], [[k, v] for k, v in by_key.items()], table_id="by-pkey",
                            numeric=("PK faults",)))
    if sites:
        header, rows = error_key_crosstab(sites)
        if rows:
            complete = result.get("sites_total", len(sites)) == len(sites)
            parts.append("<p>#PF faults by error code and key" +
                         ("" if complete else f" (from the {len(sites):,} sites listed)") + ":</p>")
            parts.append(_table(header, rows, table_id="code-by-key",
                                numeric=tuple(h for h in header if h not in ("error code", "bits"))))

    parts.append("<h2>Pages and keys</h2>")
    if pages:
        parts.append(f'<img id="plot-pages" alt="pages by key heat map" '
                     f'src="data:image/png;base64,{_png(plot_pages(pages, top_pages))}">')
        parts.append(_table(["page", "pkey", "faults"], [[p["page"], p["pkey"], p["count"]]
                                                         for p in pages[:TABLE_ROWS]],
                            table_id="pages", numeric=("faults", "pkey")))
    else:
        parts.append('<p class="note">No page data in this result.</p>')

    counters = result.get("counters") or {}
    if counters:
        parts.append("<h2>Counters</h2>" + _kv(list(counters.items()), "counters"))
    kernel = result.get("kernel") or {}
    if kernel:
        parts.append(_kv(list(kernel.items()), "kernel"))
    if result.get("symbols"):
        parts.append("<h2>Symbols</h2><ul>" + "".join(f"<li><code>{html.escape(str(s))}</code></li>"
                                                       for s in result["symbols"]) + "</ul>")
    parts.append('<p class="note">Made by pks-emu report.</p></body></html>\n')
    return "".join(parts)


def render_report(result_dict: dict, out_path: str | os.PathLike, **kw) -> str:
    """Write the report page for ``result_dict`` to ``out_path`` (atomically:
    a temporary file beside it, then a rename). Returns the path."""
    out_path = os.fspath(out_path)
    page = render_html(result_dict, **kw)
    from .atomic import atomic_output
    try:
        with atomic_output(out_path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise PksEmuError(f"{out_path}: cannot write the report: {e.strerror or e}") from None
    return out_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="replay result JSON (pks-emu replay --json > RESULT.json), or - for stdin")
    p.add_argument("-o", "--output", default="report.html", metavar="HTML",
                   help="the page to write (default: report.html)")
    p.add_argument("--top", type=int, default=TOP_SITES, metavar="N",
                   help=f"sites in the bar chart (default {TOP_SITES})")
    p.add_argument("--top-pages", type=int, default=TOP_PAGES, metavar="N",
                   help=f"pages in the heat map (default {TOP_PAGES})")
    p.add_argument("--title", help="page title")


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PksEmuError("pks-emu report needs matplotlib: pip install 'pks-emu[report]'") from None
    try:
        if args.result == "-":
            result = json.load(sys.stdin)
        else:
            with open(args.result, encoding="utf-8") as f:
                result = json.load(f)
    except OSError as e:
        raise PksEmuError(f"{args.result}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PksEmuError(f"{args.result}: not JSON: {e}") from None
    if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("pks-emu-replay/"):
        raise PksEmuError(f"{args.result}: not a pks-emu replay result (no 'schema': 'pks-emu-replay/N')")
    if args.top < 1 or args.top_pages < 1:
        raise PksEmuError("--top and --top-pages must be positive")
    try:
        render_report(result, args.output, top_sites=args.top, top_pages=args.top_pages, title=args.title)
    except OSError as e:
        raise PksEmuError(f"{args.output}: cannot write: {e.strerror or e}") from None
    print(args.output)
    return 0
