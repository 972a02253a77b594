"""``fedrec evaluate``: the report of what the language model adds, from the benchmarks' --json
files — every row beside its baselines with the ε of the run that trained it, missing results named
with the command that measures them, missed targets shown — and looked at in a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main


def lm_doc() -> dict:
    """A language-model benchmark result shaped as benchmarks/language_model.py writes it."""
    fig = {"epsilon_rdp_mf_eps8": 7.8941, "epsilon_rdp_frozen_eps8": 7.8942, "epsilon_rdp_mf_eps1": 0.9991,
           "epsilon_rdp_frozen_eps1": 0.9992, "seconds_per_round[MF only]": 0.61,
           "seconds_per_round[hybrid, frozen MiniLM + head]": 1.24, "client_rss_mb[mf,largest]": 247.0}
    for part in ("warm", "cold", "overall"):
        for model, tag, v in (("mf", "nodp", 0.30), ("frozen", "nodp", 0.29), ("mf", "eps8", 0.20),
                              ("frozen", "eps8", 0.22), ("mftower", "eps8", 0.21), ("mf", "eps1", 0.10),
                              ("frozen", "eps1", 0.15)):
            fig[f"{part}_{model}_{tag}_ndcg10"] = v
            fig[f"{part}_{model}_{tag}_coverage10"] = 0.4
        fig[f"{part}_random_ndcg10"], fig[f"{part}_genre_pop_ndcg10"] = 0.01, 0.05
    fig["exposure_frozen_eps8"] = 0.0004
    for a in (0, 0.5, 1):
        fig[f"blend_nodp_alpha{a:g}_overall_ndcg10"] = 0.1 + a / 10
    for b in (0, 1):
        fig[f"boost_eps8_{b:g}_exposure"] = 0.01 + b
        for part in ("warm", "cold", "overall"):
            fig[f"boost_eps8_{b:g}_{part}_ndcg10"] = 0.2 - b / 10
    targets = [{"name": "overall_hybrid_nodp_ndcg10_over_mf", "value": 0.973, "op": ">=", "target": 1.05, "met": False},
               {"name": "new_hybrid_eps8_ndcg10_over_random", "value": 4.66, "op": ">=", "target": 4.0, "met": True}]
    return {"figures": fig, "targets": targets}


def interactive_doc() -> dict:
    fig = {"users": 878, "nodp_alpha": 0.5, "eps8_alpha": 0.5, "eps8_epsilon": 7.8941, "nodp_epsilon": None}
    for prefix, base in (("nodp_hybrid_", 0.15), ("nodp_mf_", 0.1), ("eps8_hybrid_", 0.13), ("eps8_mf_", 0.08),
                         ("text_", 0.05), ("bm25_", 0.01)):
        for k in range(1, 6):
            fig[f"{prefix}success@{k}"] = base * k
        fig[f"{prefix}mean_turns"] = 6 - 5 * base
    return {"figures": fig, "targets": [{"name": "interactive hybrid / MF success@5 (no DP)", "value": 1.4747,
                                         "op": ">=", "target": 1.5, "met": False}]}


@pytest.fixture
def results(tmp_path: Path) -> dict[str, Path]:
    lm, inter = tmp_path / "lm.json", tmp_path / "interactive.json"
    lm.write_text(json.dumps(lm_doc()))
    inter.write_text(json.dumps(interactive_doc()))
    inter.with_suffix(".examples.json").write_text(json.dumps({"nodp": [{"target": "Fantasia (1940)", "found_at_turn": 2,
        "turns": [{"turn": 1, "said": "full of songs", "shown": [{"title": "My Fair Lady (1964)", "target": False,
                                                                   "reason": '"songs" in the request'}]},
                  {"turn": 2, "said": "a cartoon", "shown": [{"title": "Fantasia (1940)", "target": True,
                                                              "reason": '"cartoon" in the request'}]}]}]}))
    return {"lm": lm, "interactive": inter, "out": tmp_path / "report", "edge": tmp_path / "no-edge.json"}


def run(results: dict[str, Path], *extra: str) -> int:
    return main(["evaluate", "--out", str(results["out"]), "--language-model", str(results["lm"]),
                 "--interactive", str(results["interactive"]), "--edge", str(results["edge"]), *extra])


def test_the_report_puts_every_model_beside_its_baselines_with_its_epsilon(results, capsys):
    assert run(results) == 0
    md = (results["out"] / "report.md").read_text()
    # each model at each privacy setting, with the ε of the run that trained it, rounded UP (a guarantee)
    assert "| hybrid + text tower (text first) | ε = 8 | 7.895 | 0.22 | 0.22 | 0.22 |" in md
    assert "| MF + text tower fitted after training | ε = 8 | 7.895 |" in md  # the tower is post-processing of mf_eps8
    assert "| MF only (no vector for new items) | no DP | ∞ (no DP) | 0.3 |" in md
    assert "| random | — (no trained model) | — | 0.01 |" in md and "| genre popularity |" in md
    for title in ("Public text narrows the privacy gap", "The α curve of the seed formula", "Cold start",
                  "Interactive recommendation (simulated users)", "Explanations: what the device says", "Cost"):
        assert f"## {title}" in md, title
    assert "| hybrid + text tower | 0.15 | 0.22 | 0.29 |" in md  # the frontier: ε = 1, 8, no DP
    assert "| ε = 8 | 7.895 | interactive hybrid (α = 0.5) | 0.13 |" in md
    assert "| no DP | — (no trained model) | BM25 over item texts | 0.01 |" in md
    assert '★ Fantasia (1940) ("cartoon" in the request)' in md
    # missed targets are shown as missed; what was not measured says how to measure it
    assert "| language_model | overall_hybrid_nodp_ndcg10_over_mf | 0.973 | >= | 1.05 | MISSED |" in md
    assert "| interactive | interactive hybrid / MF success@5 (no DP) | 1.475 | >= | 1.5 | MISSED |" in md
    assert "edge: not measured — run: python benchmarks/edge.py --json runs/edge.json" in md
    # the HTML carries the same tables and its plots inline (self-contained); Markdown links PNG files
    page = (results["out"] / "report.html").read_text()
    assert page.count("<img") == md.count("![") >= 4 and "src='data:image/png;base64," in page
    assert all((results["out"] / f).is_file() for f in __import__("re").findall(r"\]\((plot-\d+\.png)\)", md))
    assert "<td>MISSED</td>" in page and "src=\"http" not in page and "src='http" not in page


@pytest.mark.parametrize("setup, expected", [
    ("none", "no benchmark results to report on: run python benchmarks/language_model.py --json"),
    ("bad", "lm.json: not a benchmark result"),
    ("shape", "lm.json: expected {\"figures\": {...}, \"targets\": [...]}"),
])
def test_evaluate_mistakes_are_one_line(results, capsys, setup, expected):
    if setup == "none":
        results["lm"].unlink()
        results["interactive"].unlink()
    elif setup == "bad":
        results["lm"].write_text("{not json")
    else:
        results["lm"].write_text(json.dumps({"figures": []}))
    assert run(results) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (results["out"] / "report.html").exists()  # nothing half-written


@pytest.mark.slow
def test_the_html_report_renders_in_a_real_browser_with_its_plots(results, tmp_path):
    """Headless chromium loads report.html from disk (no network: the page is self-contained) and
    draws it: the DOM has every section and table, and the screenshot has the plots' coloured lines."""
    from conftest import colour_pixels, render_in_chromium

    assert run(results) == 0
    dom, pixels = render_in_chromium(results["out"] / "report.html", tmp_path)
    for title in ("Accuracy: warm, new and all items", "Interactive recommendation (simulated users)", "Targets"):
        assert f"<h2>{title}</h2>" in dom
    assert dom.count("<table>") >= 7
    blue, orange = colour_pixels(pixels, (31, 119, 180)), colour_pixels(pixels, (255, 127, 14))
    assert blue > 300 and orange > 300, (blue, orange)  # matplotlib's first two line colours: the plots drew
