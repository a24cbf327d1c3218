"""``OUT/report.html``: one self-contained page per CV (figures inlined, no network, no scripts) that opens in
any browser: the table, the intervals and paired comparisons, subgroups, ROC, calibration, training curves,
each variant's model card and the config the folds trained with."""
from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
         "table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;"
         "text-align:right}th{background:#eef}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}pre{background:#f6f6f6;padding:.8em;overflow:auto;"
         "font-size:12px}h1{font-size:1.6em}h2{border-bottom:2px solid #99c;padding-bottom:.2em}")


def markdown_blocks(text: str) -> str:
    """Our report markdown (``|``-tables, ``#`` headings, ``-`` items, paragraphs) as HTML, escaped."""
    out, table, items = [], [], []

    def flush() -> None:
        if table:
            rows = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in table
                    if not set(line.replace("|", "").strip()) <= {"-", ":"}]
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            items.append(line[2:])
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _image(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption>' \
           f"{html.escape(caption)}</figcaption></figure>"


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def write_html_report(out: Path, variants: list[str], folds: list[int], config_text: str) -> Path:
    """OUT/report.html from the files the CV report wrote in ``out``."""
    parts = [f"<h1>Cross-validation report: {html.escape(', '.join(variants))}, folds "
             f"{html.escape(', '.join(map(str, folds)))}</h1>",
             "<h2>Table (% mean ± std over folds)</h2>", markdown_blocks(_text(out / "table.md")),
             "<h2>Uncertainty</h2>", markdown_blocks(_text(out / "uncertainty.md")),
             "<h2>Pooled out-of-fold ROC</h2>", _image(out / "roc.png", "pooled out-of-fold ROC per variant"),
             "<h2>Calibration</h2>", _image(out / "calibration.png", "reliability diagram, pooled out-of-fold"),
             "<h2>Training curves (per fold)</h2>", _image(out / "curves.png", "loss, AUC and lr per epoch, each fold"),
             "<h2>Subgroups</h2>", markdown_blocks(_text(out / "subgroups.md"))]
    for variant in variants:
        card = _text(out / variant / "MODEL_CARD.md")
        if card:
            parts += [f"<h2>Model card: {html.escape(variant)}</h2>", markdown_blocks(card.split("\n", 1)[-1])]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text)}</pre>"]
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>zoome cv report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    path.write_text(page)
    return path
