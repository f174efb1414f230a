"""quietstar/plots.py, the one module that draws: each figure has its panels and series, and lands as a PNG of
the figure's size written by matplotlib."""

import json
import struct
import zlib

import pytest

from quietstar import plots


def png_facts(path) -> dict:
    """Width, height and text chunks of a PNG, after checking its signature and every chunk's CRC; `pixels`: the
    number of distinct bytes in the filtered image data (a blank canvas has very few)."""
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, text = 8, b"", {}
    while pos < len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        tag, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + data) & 0xFFFFFFFF == struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IDAT":
            idat += data
        elif tag == b"tEXt":
            key, _, value = data.partition(b"\x00")
            text[key.decode()] = value.decode("latin-1")
        pos += 12 + n
    w, h = struct.unpack(">II", png[16:24])
    return {"size": (w, h), "text": text, "pixels": len(set(zlib.decompress(idat)))}


@pytest.fixture
def drawn(monkeypatch):
    """Each figure saved through plots.save_figure, as {"title", "axes": [(title, lines, bars, points), ...]}
    for its visible axes, taken just before it is written."""
    figures, save = [], plots.save_figure

    def keep(fig, out, **kw):
        axes = [(ax.get_title(), len(ax.get_lines()), len(ax.patches),
                 sum(len(c.get_offsets()) for c in ax.collections)) for ax in fig.axes if ax.axison]
        figures.append({"title": fig._suptitle.get_text() if fig._suptitle else "", "axes": axes})
        return save(fig, out, **kw)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def rows(n=5, **extra):
    return [{"step": s, "train/nll_base": 3.0 - 0.1 * s, "train/nll_talk": 2.9 - 0.1 * s,
             "thought/reward_mean": 0.01 * s, "thought/advantage_pos_frac": 0.5, "thought/mix_weight_mean": 0.2,
             "thought/entropy_first_token": 2.0 - 0.2 * s, "thought/reward_std": 0.1, "train/lr": 1e-3, **extra}
            for s in range(1, n + 1)]


def test_plot_run_draws_a_panel_per_logged_metric(tmp_path, drawn):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": r["step"], "train/nll_base": r["train/nll_base"], "train/nll_talk": r["train/nll_talk"],
                         "thought/reward_mean": r["thought/reward_mean"], "train/lr": "nan"}) for r in rows()]
    metrics.write_text("\n".join(lines) + '\n{"step": 6, "train/nll')  # a torn last line is ignored
    out = plots.plot_run(metrics, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and not list(tmp_path.glob(".*.tmp"))
    panels = drawn[0]["axes"]
    assert [(t, n) for t, n, _, _ in panels] == [("NLL: no thought / after a thought / objective", 2),
                                                ("reward (mean over positions)", 1), ("learning rate", 1)]
    png = png_facts(out)
    assert png["size"] == (round(4.3 * 3 * 110), round(3.2 * 110)) and "Matplotlib" in png["text"]["Software"]
    assert png["pixels"] > 20
    (tmp_path / "empty.jsonl").write_text('{"note": "no step"}\n')
    assert plots.plot_run(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_plot_gain_by_difficulty_bars_and_tokens(tmp_path, drawn):
    buckets = [{"gain": g, "base_ce_range": [i, i + 1]} for i, g in enumerate([-0.01, None, 0.02])]
    out = plots.plot_gain_by_difficulty(buckets, [0.5, 1.5, 2.5, 3.0], [0.1, -0.2, 0.0, 0.3], tmp_path / "g.png",
                                        title="tiny")
    (t1, _, bars, _), (t2, _, _, points) = drawn[0]["axes"]
    assert (t1, bars, t2, points, drawn[0]["title"]) == ("gain from thinking by difficulty", 3, "per token", 4, "tiny")
    png = png_facts(out)
    assert png["size"] == (1000, 400) and "Matplotlib" in png["text"]["Software"] and png["pixels"] > 20


def test_recipe_figures_draw_every_series(tmp_path, drawn):
    nll = {m: {"all": 1.0, "1": 0.5, "2": 1.0, "3": 1.5} for m in ("thought", "no_thought", "baseline")}
    baseline = [{"step": s, "train/nll": 3.0 - 0.05 * s} for s in range(1, 11)]
    plots.plot_learning_curves(rows(), baseline, nll, tmp_path / "l.png", title="learning")
    axes = drawn[0]["axes"]
    assert len(axes) == 6 and [n for _, n, _, _ in axes[:5]] == [1, 1, 1, 1, 3]
    assert axes[5][0] == "held-out answer NLL" and axes[5][2] == 9  # 3 difficulties ("all" left out) x 3 models

    point = lambda s: {"step": s, "nll_thought": 1.0, "nll_no_thought": 1.2, "chain_share": 0.3}
    before = {**point(0), "hops": "3"}
    plots.plot_over_training({"quietstar": [point(1), point(2)], "policy_off": [point(1), point(2)]}, before,
                             tmp_path / "o.png", title="over training")
    (t0, chain, _, _), (t1, nll_lines, _, _) = drawn[1]["axes"]
    assert (chain, nll_lines, t1) == (2, 4, "held-out 3-hop answer NLL")  # thought and no thought per stage

    stages = ("official", "rlp", "policy_off")
    plots.plot_stage_comparison({s: rows() for s in stages},
                                {s: [{"step": k, "gain": 0.01 * k} for k in range(3)] for s in stages},
                                {s: [{"bucket": b, "gain": 0.01 * b} for b in range(5)] for s in stages},
                                tmp_path / "c.png", title="stages")
    axes = drawn[2]["axes"]
    assert [n for _, n, _, _ in axes[:4]] == [3, 3, 3, 3] and axes[4][1] == 3 + 1  # + the zero line
    assert axes[5][2] == 15 and drawn[2]["title"] == "stages"
    for name, size in (("l", (1430, 715)), ("o", (1210, 440)), ("c", (1540, 770))):
        assert png_facts(tmp_path / f"{name}.png")["size"] == size
