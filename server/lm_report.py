"""``fedrec evaluate``: one report of what the language model adds to the recommender.

It renders what the benchmarks measured — ``benchmarks/language_model.py --json`` (accuracy on
warm, new and all items, the privacy frontier, the α curve of the seed formula, cold-start lift,
cost), ``benchmarks/interactive.py --json`` (simulated users' success per turn, example
conversations) and, when given, ``benchmarks/edge.py --json`` (the device) — side by side with
their baselines, every model with the ε of the run that trained it. No number is computed here
that the benchmark did not write; what a file does not have is printed as "not measured" with the
command that measures it. Markdown and a self-contained HTML (plots inline), from one document
model (a list of sections).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.report_render import CSS, _html_table, _md_table, _png

MODELS = {"mf": "MF only (no vector for new items)", "mftower": "MF + text tower fitted after training",
          "frozen_raw": "hybrid (MiniLM + head), as trained", "frozen": "hybrid + text tower (text first)",
          "lora": "hybrid, LoRA + text tower", "random": "random", "genre_pop": "genre popularity",
          "text_only": "text only (MiniLM profile)"}
#: Which run trained a row's model (its ε): the tower is fitted after training, on the released model.
TRAINED_BY = {"mftower": "mf", "frozen_raw": "frozen"}
MEASURE = {"language_model": "python benchmarks/language_model.py --json runs/language_model.json",
           "interactive": "python benchmarks/interactive.py --json runs/interactive.json",
           "edge": "python benchmarks/edge.py --json runs/edge.json"}


@dataclass
class Section:
    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    plot: str | None = None  # base64 PNG
    notes: list[str] = field(default_factory=list)


def load(path: Path | None) -> dict[str, Any] | None:
    """A benchmark's ``--json`` file; None when not given or not there. ValueError naming the file
    when it is not one."""
    if path is None or not Path(path).is_file():
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a benchmark result ({exc})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("figures"), dict) and isinstance(doc.get("targets"), list)):
        raise ValueError(f"{path}: expected {{\"figures\": {{...}}, \"targets\": [...]}} (a benchmark's --json file)")
    return doc


def _eps_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "∞ (no DP)"
    return f"{math.ceil(float(value) * 1000) / 1000:.3f}"  # a guarantee is rounded up, never down


def _setting(tag: str) -> str:
    return "no DP" if tag == "nodp" else f"ε = {tag[3:]}" if tag.startswith("eps") else tag


def _num(x: Any, digits: int = 4) -> Any:
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else ("—" if x is None else x)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- sections

def accuracy(fig: dict[str, Any]) -> Section:
    pattern = re.compile(r"^(warm|cold|overall)_(.+?)(?:_(nodp|eps[\d.]+))?_(ndcg10|recall20|recall10|coverage10|"
                         r"novelty10)$")
    table: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in fig.items():
        m = pattern.match(key)
        if m:
            table.setdefault((m.group(2), m.group(3) or ""), {})[f"{m.group(1)}_{m.group(4)}"] = value
    order = list(MODELS)
    rows = []
    for (model, tag), v in sorted(table.items(), key=lambda kv: (not kv[0][1], kv[0][1] != "nodp",
                                                                  _tag_value(kv[0][1]),
                                                                  order.index(kv[0][0]) if kv[0][0] in order else 99)):
        run = f"{TRAINED_BY.get(model, model)}_{tag}"
        eps = fig.get(f"epsilon_rdp_{run}") if tag != "nodp" else None
        privacy, eps_text = (_setting(tag), _eps_text(eps)) if tag else ("— (no trained model)", "—")
        suffix = f"_{tag}" if tag else ""
        rows.append((MODELS.get(model, model), privacy, eps_text, _num(v.get("warm_ndcg10")),
                     _num(v.get("cold_ndcg10")), _num(v.get("overall_ndcg10")), _num(v.get("overall_recall20")),
                     _num(v.get("overall_coverage10")), _num(v.get("overall_novelty10")),
                     _num(fig.get(f"exposure_{model}{suffix}"))))
    return Section("Accuracy: warm, new and all items",
                   "ML-100K cold-item split (20 % of the items held out with all their interactions), full ranking "
                   "against all items, the user's training and validation items masked. warm = warm test "
                   "interactions among all items; new = new items' interactions among the new items only; overall = "
                   "every held-out interaction among all items. Exposure = share of top-10 slots that go to new items "
                   "÷ their share of the held-out interactions (1 = calibrated).",
                   ["model", "privacy", "ε (user-level, δ = 1e-4)", "warm NDCG@10", "new NDCG@10", "overall NDCG@10",
                    "overall Recall@20", "coverage@10", "novelty@10", "exposure"], rows)


def _tag_value(tag: str) -> float:
    try:
        return float(tag[3:])
    except ValueError:
        return math.inf


def frontier(fig: dict[str, Any]) -> Section | None:
    names = {"mf": "MF only", "mftower": "MF + text tower", "frozen": "hybrid + text tower"}
    eps = sorted({_tag_value(m.group(1)) for k in fig for m in [re.match(r"^overall_\w+?_(eps[\d.]+)_ndcg10$", k)] if m})
    if not eps:
        return None
    rows, plt = [], _plt()
    f, ax = plt.subplots(figsize=(6.2, 3.6))
    for key, name in names.items():
        pts = [(e, fig.get(f"overall_{key}_eps{e:g}_ndcg10")) for e in eps]
        pts = [(e, v) for e, v in pts if v is not None]
        nodp = fig.get(f"overall_{key}_nodp_ndcg10")
        if pts:
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
            if nodp is not None:
                ax.axhline(nodp, color=line.get_color(), ls=":", lw=1)
        rows.append((name, *[_num(fig.get(f"overall_{key}_eps{e:g}_ndcg10")) for e in eps], _num(nodp)))
    ax.set(xscale="log", xlabel="user-level ε (δ = 1e-4)", ylabel="overall NDCG@10",
           title="Privacy frontier (dotted: no DP)")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.legend(fontsize=8)
    return Section("Public text narrows the privacy gap", "Overall NDCG@10 at each ε (the same rounds and sampling "
                   "rate; σ planned by the RDP accountant), MF and the hybrid side by side.",
                   ["model", *[f"ε = {e:g}" for e in eps], "no DP"], rows, _png(f, plt))


def alpha_curve(fig: dict[str, Any]) -> Section | None:
    pts: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for k, v in fig.items():
        m = re.match(r"^blend_(nodp|eps[\d.]+)_alpha([\d.]+)_(warm|cold|overall)_ndcg10$", k)
        if m and v is not None:
            pts.setdefault((m.group(1), m.group(3)), []).append((float(m.group(2)), v))
    if not pts:
        return None
    plt = _plt()
    f, ax = plt.subplots(figsize=(6.2, 3.6))
    rows = []
    for (tag, part), p in sorted(pts.items()):
        p.sort()
        ax.plot([a for a, _ in p], [v for _, v in p], marker="o", ls="-" if tag == "nodp" else "--",
                label=f"{part}, {_setting(tag)}")
        rows.append((part, _setting(tag), *[_num(v) for _, v in p]))
    alphas = [a for a, _ in sorted(next(iter(pts.values())))]
    ax.set(xlabel="α (1 = MF scores only, 0 = text profile only)", ylabel="NDCG@10",
           title="The seed formula r = α·z(r_cf) + (1−α)·z(r_cb)")
    ax.legend(fontsize=7, ncol=2)
    return Section("The α curve of the seed formula", "MF scores and MiniLM-profile cosines, each standardised per "
                   "user, mixed with weight α.", ["evaluation", "privacy", *[f"α = {a:g}" for a in alphas]], rows,
                   _png(f, plt))


def cold_start(fig: dict[str, Any]) -> Section | None:
    rows = []
    for tag in ("nodp", "eps8"):
        hybrid = fig.get(f"cold_frozen_{tag}_ndcg10")
        if hybrid is None:
            continue
        rnd, pop = fig.get("cold_random_nodp_ndcg10") or fig.get("cold_random_ndcg10"), \
            fig.get("cold_genre_pop_nodp_ndcg10") or fig.get("cold_genre_pop_ndcg10")
        rows.append((_setting(tag), _num(hybrid), _num(rnd), _num(pop), _num(hybrid / rnd if rnd else None, 2),
                     _num(hybrid / pop if pop else None, 2)))
    boosts = sorted({float(m.group(1)) for k in fig for m in [re.match(r"^boost_eps8_([\d.]+)_exposure$", k)] if m})
    plot = None
    if boosts:
        plt = _plt()
        f, ax = plt.subplots(figsize=(6.2, 3.4))
        for part in ("warm", "cold", "overall"):
            ax.plot(boosts, [fig.get(f"boost_eps8_{b:g}_{part}_ndcg10") for b in boosts], marker="o", label=part)
        ax2 = ax.twinx()
        ax2.plot(boosts, [fig.get(f"boost_eps8_{b:g}_exposure") for b in boosts], color="k", ls=":", label="exposure")
        ax.set(xlabel="bias boost of new items", ylabel="NDCG@10 (ε = 8)", title="New items' exposure policy")
        ax2.set_ylabel("exposure (dotted)")
        ax.legend(fontsize=8, loc="center left")
        plot = _png(f, plt)
    if not rows and plot is None:
        return None
    return Section("Cold start: new items ranked from their text", "New items' interactions ranked among the new "
                   "items only: the hybrid's text tower against random and genre popularity (MostPop within the "
                   "user's genres). The plot: what a bias boost for new items trades (exposure against warm accuracy).",
                   ["privacy", "hybrid NDCG@10", "random", "genre popularity", "× random", "× genre popularity"],
                   rows, plot)


def interactive(doc: dict[str, Any], conversations: dict[str, Any] | None) -> list[Section]:
    fig = doc["figures"]
    systems = [("interactive hybrid", "{tag}_hybrid_"), ("text only", "text_"), ("BM25 over item texts", "bm25_"),
               ("MF, not interactive", "{tag}_mf_")]
    rows, curves = [], {}
    for tag in ("nodp", "eps8"):
        if f"{tag}_hybrid_success@5" not in fig:
            continue
        for name, prefix in systems:
            p = prefix.format(tag=tag)
            values = [fig.get(f"{p}success@{k}") for k in range(1, 6)]
            label = f"{name} (α = {fig.get(f'{tag}_alpha')})" if name == "interactive hybrid" else name
            modelless = name in ("text only", "BM25 over item texts")
            eps = "— (no trained model)" if modelless else _eps_text(fig.get(f"{tag}_epsilon"))
            rows.append((_setting(tag), eps, label, *[_num(v) for v in values], _num(fig.get(f"{p}mean_turns"), 2)))
            if not modelless or tag == "nodp":
                curves[name if modelless else f"{name}, {_setting(tag)}"] = values
    plt = _plt()
    f, ax = plt.subplots(figsize=(6.2, 3.6))
    for name, values in curves.items():
        ax.plot(range(1, 6), values, marker="o", ls="--" if "ε" in name else "-", label=name)
    ax.set(xlabel="turns (5 items shown per turn)", ylabel="share of users whose target was shown",
           title="Simulated users: success within k turns", xticks=range(1, 6))
    ax.legend(fontsize=7)
    out = [Section("Interactive recommendation (simulated users)",
                   f"{fig.get('users')} test users, one liked held-out item each; the simulated user opens with a "
                   "request built from the item's public metadata in words that are not the catalogue's ('funny', "
                   "'from the eighties') and adds one attribute per turn; 5 items per turn, up to 5 turns, an item "
                   "shown is not shown again. Text only and BM25 use no model (no ε); the MF and hybrid rows use the "
                   "federated MF model trained at that privacy setting.",
                   ["privacy", "ε", "system", *[f"success@{k}" for k in range(1, 6)], "mean turns"], rows, _png(f, plt))]
    if conversations:
        ex = Section("Explanations: what the device says", "Whole conversations of the interactive hybrid (the "
                     "first test users whose target was found after the first turn); each item with the reason "
                     "fedrec-client chat prints. ★ marks the held-out target.",
                     ["privacy", "turn", "the user said", "items shown (reason)"])
        for tag, convs in conversations.items():
            for conv in convs[:2]:
                for t in conv["turns"]:
                    shown = "; ".join(("★ " if s["target"] else "") + f"{s['title']} ({s['reason']})" for s in t["shown"])
                    ex.rows.append((_setting(tag), t["turn"], t["said"], shown))
        out.append(ex)
    return out


def cost(fig: dict[str, Any], edge: dict[str, Any] | None) -> Section | None:
    rows = [(k[len("seconds_per_round["):-1], "seconds per round (in-process, all clients of a round)", _num(v, 3))
            for k, v in fig.items() if k.startswith("seconds_per_round[")]
    rows += [(k[len("client_rss_mb["):-1], "peak RSS of one client's round, MB (fresh process)", _num(v, 1))
             for k, v in fig.items() if k.startswith("client_rss_mb[")]
    if edge:
        rows += [(k, "benchmarks/edge.py", _num(v, 3)) for k, v in edge["figures"].items()
                 if any(w in k for w in ("rss", "ms", "seconds"))]
    if not rows:
        return None
    return Section("Cost", "Time per round with and without the language model, and a device's memory.",
                   ["what", "measured", "value"], rows)


def targets_section(docs: dict[str, dict[str, Any]]) -> Section:
    rows = [(name, t["name"], _num(t["value"]), t["op"], t["target"], "met" if t["met"] else "MISSED")
            for name, doc in docs.items() for t in doc["targets"]]
    return Section("Targets", "Each benchmark's own targets, as it checked them. A missed target is shown, not hidden.",
                   ["benchmark", "target", "value", "op", "goal", ""], rows)


def build(sources: dict[str, Path | None]) -> tuple[list[Section], dict[str, str]]:
    """The report's sections from the benchmark files in ``sources`` (language_model, interactive,
    edge): (sections, {name: what was read or the command that measures it})."""
    docs = {name: load(path) for name, path in sources.items()}
    found = {name: doc for name, doc in docs.items() if doc is not None}
    if not found:
        raise ValueError("no benchmark results to report on: run " + " and ".join(MEASURE[n] for n in
                                                                                  ("language_model", "interactive")))
    used = {name: (str(sources[name]) if name in found else f"not measured — run: {MEASURE[name]}") for name in MEASURE}
    sections: list[Section] = []
    lm = found.get("language_model")
    if lm:
        fig = lm["figures"]
        sections.append(accuracy(fig))
        sections += [s for s in (frontier(fig), alpha_curve(fig), cold_start(fig)) if s is not None]
    if "interactive" in found:
        side = Path(sources["interactive"]).with_suffix(".examples.json")
        convs = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None
        sections += interactive(found["interactive"], convs)
    if lm or "edge" in found:
        c = cost(lm["figures"] if lm else {}, found.get("edge"))
        if c is not None:
            sections.append(c)
    sections.append(targets_section(found))
    return sections, used


def _sources(used: dict[str, str]) -> list[str]:
    return [f"{name}: {what}" for name, what in used.items()]


def to_markdown(sections: Sequence[Section], used: dict[str, str], generated: str) -> str:
    out = ["# What the language model adds to the recommender", "",
           f"Generated {generated} by `fedrec evaluate` from the benchmarks' results (every number below was "
           "computed by the benchmark that wrote it; ε by the accountant of the run that trained the model):", ""]
    out += [f"- {line}" for line in _sources(used)] + [""]
    for i, s in enumerate(sections):
        out += [f"## {s.title}", "", s.text, ""]
        if s.plot:
            out += [f"![{s.title}](plot-{i}.png)", ""]
        if s.rows:
            out.append(_md_table(s.header, s.rows))
        out += [f"> {n}" for n in s.notes]
    return "\n".join(out).rstrip() + "\n"


def to_html(sections: Sequence[Section], used: dict[str, str], generated: str) -> str:
    esc = html.escape
    parts = ["<h1>What the language model adds to the recommender</h1>",
             f"<div class=meta>Generated {esc(generated)} by fedrec evaluate from the benchmarks' results: every "
             "number was computed by the benchmark that wrote it; ε by the accountant of the run that trained the "
             "model.</div><ul>" + "".join(f"<li>{esc(line)}</li>" for line in _sources(used)) + "</ul>"]
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2><p>{esc(s.text)}</p>")
        if s.plot:
            parts.append(f"<div class=figs><img alt='{esc(s.title)}' src='data:image/png;base64,{s.plot}'></div>")
        if s.rows:
            parts.append(_html_table(s.header, s.rows))
        parts += [f"<div class=warn>{esc(n)}</div>" for n in s.notes]
    style = CSS + "td{max-width:720px}"
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fedrec: what the language model adds"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write(out_dir: Path, sources: dict[str, Path | None], generated: str) -> list[Path]:
    """report.md (+ its plot-N.png) and report.html (self-contained) in ``out_dir``."""
    import base64

    sections, used = build(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, s in enumerate(sections):
        if s.plot:
            path = out_dir / f"plot-{i}.png"
            path.write_bytes(base64.b64decode(s.plot))
            written.append(path)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(sections, used, generated), encoding="utf-8")
    page.write_text(to_html(sections, used, generated), encoding="utf-8")
    return [md, page, *written]
