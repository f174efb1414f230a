"""A per-token view of what thinking does: a self-contained HTML page and a PNG plot.

HTML: every token of a few held-out records, coloured by its gain from thinking, CE_base - CE_thought
(green: the thought before it made it more likely; red: less likely; white: no change). Hovering shows
the thought sampled before the token and the numbers; clicking pins them in the panel at the top (the
address suffix #t=N selects token N on load). The first token of a record is not predicted and stays
grey. No external resources.

PNG (quietstar/plots.py, embedded in the page too): the mean gain per difficulty bucket (quantiles of the base
CE), and the per-token gain against the base CE.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from quietstar.eval.nll import TokenScores, summarize
from quietstar.plots import plot_gain_by_difficulty


def token_pieces(tok, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoding prefixes so that multi-byte characters come out whole."""
    pieces, prev = [], ""
    for k in range(len(ids)):
        cur = tok.decode(list(ids[:k + 1]))
        if cur.endswith("\ufffd") and k + 1 < len(ids):  # a character cut in two: it shows on its last token
            pieces.append("")
            continue
        pieces.append(cur[len(prev):] if cur.startswith(prev) else tok.decode([ids[k]]))
        prev = cur
    return pieces


def gain_colour(g: float, cap: float) -> str:
    """Diverging: green for g > 0, red for g < 0, alpha by |g| / cap."""
    a = min(abs(g) / cap, 1.0) if cap > 0 else 0.0
    rgb = "22,160,70" if g > 0 else "214,40,40"
    return f"rgba({rgb},{0.08 + 0.77 * a:.3f})" if a > 0 else "transparent"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#fafafa;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:10px 18px;z-index:2}
h1{font-size:18px;margin:0 0 6px 0}
.summary{font-size:13px;color:#444}
.legend{display:inline-block;vertical-align:middle;width:220px;height:12px;margin:0 6px;border:1px solid #ccc;
 background:linear-gradient(90deg,rgba(214,40,40,.85),rgba(214,40,40,.08) 48%,#fff 50%,rgba(22,160,70,.08) 52%,rgba(22,160,70,.85))}
#panel{margin-top:8px;font-size:13px;background:#f3f6ff;border:1px solid #c9d3f0;border-radius:4px;padding:6px 8px;
 min-height:36px;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace}
main{padding:12px 18px;max-width:1100px}
.doc{background:#fff;border:1px solid #ddd;border-radius:4px;padding:10px 12px;margin:0 0 14px 0;
 font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;line-height:1.75;white-space:pre-wrap;word-wrap:break-word}
.doc h2{font-family:system-ui,sans-serif;font-size:13px;color:#666;margin:0 0 6px 0;white-space:normal}
.t{border-radius:2px;cursor:pointer}
.t:hover{outline:1px solid #333}
.t.sel{outline:2px solid #1a4fd0}
.t0{color:#999}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
img{max-width:100%;border:1px solid #ddd;background:#fff}
"""

_JS = """
const D = JSON.parse(document.getElementById('data').textContent);
const panel = document.getElementById('panel');
let sel = null;
document.querySelectorAll('.t[data-i]').forEach(el => el.addEventListener('click', () => {
  const d = D[+el.dataset.i];
  if (sel) sel.classList.remove('sel');
  sel = el; el.classList.add('sel');
  panel.textContent = 'token ' + JSON.stringify(d.tok) + '   gain ' + d.g.toFixed(3) + ' nats   CE base '
    + d.b.toFixed(3) + ' -> with thought ' + d.c.toFixed(3) + '   w ' + d.w.toFixed(3)
    + '\\nthought before it: ' + JSON.stringify(d.th);
}));
const m = location.hash.match(/^#t=(\\d+)$/);  // #t=N selects token N on load (a link to a token)
if (m) { const el = document.querySelector('.t[data-i="' + m[1] + '"]'); if (el) { el.click(); el.scrollIntoView({block: 'center'}); } }
"""


def render_html(tok, scores: TokenScores, summary: dict, title: str = "Quiet-STaR: per-token gain from thinking",
                subtitle: str = "", png: Optional[bytes] = None, max_records: Optional[int] = None) -> str:
    """The page (a string). Tokens of record r at position i + 1 are coloured by the gain of their
    prediction, made at position i after the thought sampled there."""
    gain = scores.gain
    cap = float(np.quantile(np.abs(gain), 0.95)) if len(gain) else 0.0
    cap = max(cap, 1e-3)
    details, docs = [], []
    n_records = len(scores.ids) if max_records is None else min(max_records, len(scores.ids))
    for r in range(n_records):
        ids = scores.ids[r]
        pieces = token_pieces(tok, ids)
        sel = np.nonzero(scores.record == r)[0]
        by_pos = {int(scores.position[k]): k for k in sel}
        spans = [f'<span class="t t0" title="first token: not predicted">{html.escape(pieces[0])}</span>']
        for j in range(1, len(ids)):
            k = by_pos.get(j - 1)
            if k is None:
                spans.append(html.escape(pieces[j]))
                continue
            thought = tok.decode([int(t) for t in scores.thoughts[k]]) if scores.thoughts.shape[1] else ""
            g, b, c, w = float(gain[k]), float(scores.ce_base[k]), float(scores.ce_thought[k]), float(scores.mix_weight[k])
            tip = (f"gain {g:+.3f} nats (CE {b:.3f} -> {c:.3f}), w {w:.3f}\nthought before it: {thought}")
            details.append({"tok": pieces[j], "g": g, "b": b, "c": c, "w": w, "th": thought})
            spans.append(f'<span class="t" data-i="{len(details) - 1}" style="background:{gain_colour(g, cap)}" '
                         f'title="{html.escape(tip, quote=True)}">{html.escape(pieces[j])}</span>')
        rec_gain = gain[sel].mean() if len(sel) else 0.0
        docs.append(f'<div class="doc"><h2>record {r}: {len(ids)} tokens, mean gain {rec_gain:+.4f} nats/token'
                    f'</h2>{"".join(spans)}</div>')
    rows = "".join(
        f"<tr><td>{b['bucket']}</td><td>{b['base_ce_range'][0]:.2f} - {b['base_ce_range'][1]:.2f}</td>"
        f"<td>{b['tokens']}</td><td>{_fmt(b['nll_base'])}</td><td>{_fmt(b['nll_thought'])}</td>"
        f"<td>{_fmt(b['gain'], '+.4f')}</td><td>{_fmt(b['frac_improved'], '.2f')}</td></tr>"
        for b in summary["buckets"])
    table = ("<table><tr><th>bucket</th><th>base CE range</th><th>tokens</th><th>NLL base</th>"
             f"<th>NLL thought</th><th>gain</th><th>frac improved</th></tr>{rows}</table>")
    img = (f'<img alt="gain by difficulty" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "")
    data = json.dumps(details).replace("</", "<\\/")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f'<div class="summary">{html.escape(subtitle)}<br>NLL base {summary["nll_base"]:.4f}, with thought '
            f'{summary["nll_thought"]:.4f} nats/token (gain {summary["gain"]:+.4f}) over {summary["tokens"]} tokens; '
            f'colour: CE<sub>base</sub> - CE<sub>thought</sub>, -{cap:.3f}<span class="legend"></span>+{cap:.3f} nats. '
            "Hover a token for the thought before it; click to pin.</div>"
            f'<div id="panel">click a token</div></header><main>{"".join(docs)}'
            f"<h2>By difficulty (quantiles of the base CE)</h2>{table}{img}</main>"
            f'<script type="application/json" id="data">{data}</script><script>{_JS}</script></body></html>')


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def write_report(path, tok, scores: TokenScores, n_buckets: int = 5, subtitle: str = "",
                 max_records: Optional[int] = None) -> dict:
    """Write PATH (.html) and PATH with .png; -> the summary plus where things went."""
    path = Path(path)
    summary = summarize(scores, n_buckets)
    path.parent.mkdir(parents=True, exist_ok=True)
    png_path = plot_gain_by_difficulty(summary["buckets"], scores.ce_base, scores.gain, path.with_suffix(".png"))
    path.write_text(render_html(tok, scores, summary, subtitle=subtitle, png=png_path.read_bytes(),
                                max_records=max_records), encoding="utf-8")
    return {**summary, "html": str(path), "png": str(png_path)}
