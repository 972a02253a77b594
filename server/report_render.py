"""Rendering of the privacy report (:mod:`server.report`): Markdown, self-contained HTML with
inline PNG plots. matplotlib is imported only when plotting (edge clients do not ship it)."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

CI_SUFFIX = "_ci95"  # an eval row's 95% CI half-width of a metric: "ndcg@10_ci95"


def _eps(x: float | None) -> str:
    """ε for display, rounded UP to 3 decimals (rounding a guarantee down would overstate it)."""
    import math

    if x is None:
        return "n/a"

    return f"{math.ceil(x * 1000) / 1000:.3f}"

def _fmt(x: Any) -> str:
    if x is None or isinstance(x, bool):
        return {None: "—", True: "on", False: "off"}[x]
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _param_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    p, names = rep["parameters"], {
        "noise_multiplier": "noise multiplier σ", "clip": "clip norm C (L2, whole update)",
        "sample_rate": "sample rate q", "delta": "δ", "rounds_configured": "rounds configured",
        "rounds_released": "rounds released", "population": "population N", "accountant": "enforcing accountant",
        "unit": "unit of privacy", "relation": "neighbouring relation", "sampling": "sampling",
        "noise_source": "noise source",
        "secure_aggregation": "secure aggregation", "partition": "partition"}
    rows = [(label, _fmt(p[key])) for key, label in names.items()]
    if p.get("released_arrays"):
        released = p["released_arrays"]
        lora = [n for n in released if n.startswith("lora.")]
        shown = [n for n in released if not n.startswith("lora.")] + ([f"{len(lora)} LoRA arrays (lora.*)"] if lora else [])
        rows.append(("released arrays (covered by ε)", ", ".join(shown)))
    if rep.get("epsilon_without_amplification"):
        e = rep["epsilon_without_amplification"]
        rows.append(("ε if the cohorts are known (no amplification; under distributed DP: against the server)",
                     f"{_eps(e['rdp'])} (RDP), {_eps(e['pld'])} (PLD)"))
    if rep.get("silo_level_epsilon"):
        e = rep["silo_level_epsilon"]
        rows.append(("ε for one whole silo (add/remove)", f"{_eps(e['rdp'])} (RDP), {_eps(e['pld'])} (PLD)"))
    if rep["budget"]:
        b = rep["budget"]
        rows.append(("target ε", _fmt(b["target_epsilon"]) if b["target_epsilon"] else "none"))
        if b["stopped_before_round"]:
            rows.append(("budget stop", f"stopped before round {b['stopped_before_round']} ({b['reason']})"))
    return rows


def _eps_rows(rep: dict[str, Any], limit: int = 12) -> list[tuple[int, str, str]]:
    rdp, pld = dict(map(tuple, rep["epsilon_history"]["rdp"])), dict(map(tuple, rep["epsilon_history"]["pld"]))
    shown = sorted(pld or rdp)
    rounds = shown if len(shown) <= limit else [shown[round(i * (len(shown) - 1) / (limit - 1))] for i in range(limit)]
    return [(r, _eps(rdp[r]) if r in rdp else "—", _eps(pld[r]) if r in pld else "n/a") for r in dict.fromkeys(rounds)]


def _final_table(ft: dict[str, Any]) -> tuple[list[str], list[tuple], str]:
    """Final test metrics as rows of metrics by columns of cut-offs (``ndcg@10`` -> row ndcg, column @10).
    A test on a sample of the clients says so in the caption, and each cell is mean ± 95% CI half-width."""
    metrics = [k for k in ft if "@" in k and not k.endswith(CI_SUFFIX)]
    ks = sorted({int(k.split("@")[1]) for k in metrics})
    names = sorted({k.split("@")[0] for k in metrics})
    caption = f"round {ft.get('round')}, {ft.get('users')} users"
    if not ft.get("sampled"):
        return ["metric", *(f"@{k}" for k in ks)], [(n, *(ft.get(f"{n}@{k}") for k in ks)) for n in names], caption

    def cell(name: str) -> str | None:
        mean, half = ft.get(name), ft.get(name + CI_SUFFIX)
        if mean is None:
            return None
        return f"{_fmt(mean)} ± {_fmt(half) if half is not None else 'n/a'}"

    how = "secret" if ft.get("secret", True) else "SEEDED by fed.sampling-seed, not secret"
    caption += (f"; a random sample of {ft.get('sampled_clients')} of {ft.get('population')} clients ({how}): "
                "mean ± 95% confidence interval half-width")
    return ["metric", *(f"@{k}" for k in ks)], [(n, *(cell(f"{n}@{k}") for k in ks)) for n in names], caption


def _phase(u: dict[str, Any]) -> str:
    """An eval row's phase, marked when the row evaluated a random sample of the clients (the final test)."""
    return f"{u['phase']} (client sample)" if u.get("sampled") else str(u["phase"])


def claim_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """The signed claims as (what, statement) rows."""
    c = rep["claims"]
    rows = []
    if c["unit"]:
        rows += [("unit of privacy", c["unit"]), ("neighbouring relation", c["relation"])]
    if c["amplification"]:
        a = c["amplification"]
        verdict = ("claimed, and it holds" if a["claimed"] and a["holds"] else
                   "claimed, but it does NOT hold for this run" if a["claimed"] else "not claimed")
        rows.append(("amplification by sampling", f"{verdict}: {a['why']}"))
    rows.append(("what the server sees", c["server_sees"]))
    rows += [("outside ε", item) for item in c["outside_epsilon"]]
    return rows


def _md_table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |"
                              for row in rows]) + "\n"


def to_markdown(rep: dict[str, Any]) -> str:
    out = [f"# Privacy report: run {rep['run']['id']}\n", f"Generated {rep['run']['generated_at']} from "
           f"`{rep['run']['path']}`.\n", f"**{rep['guarantee']}**\n"]
    out += [f"> **WARNING:** {w}\n" for w in rep["warnings"]]
    if rep["epsilon"]:
        e = rep["epsilon"]
        out.append(f"Mechanism: {rep['mechanism']}. ε = {_eps(e['rdp'])} (RDP), {_eps(e['pld'])} (PLD) "
                   f"at δ = {_fmt(e['delta'])}.\n")
    out += ["## What is claimed\n", _md_table(["", "statement"], claim_rows(rep))]
    out += ["## Parameters\n", _md_table(["parameter", "value"], _param_rows(rep))]
    if rep["epsilon_history"]:
        out += ["## ε over rounds\n", _md_table(["round", "ε (RDP)", "ε (PLD)"], _eps_rows(rep))]
    out += ["## Utility\n", _md_table(["round", "phase", "NDCG@10", "Recall@10"],
                                      [(u["round"], _phase(u), u["ndcg@10"], u["recall@10"]) for u in rep["utility"]])]
    if rep["final_test"]:
        header, rows, caption = _final_table(rep["final_test"])
        out += [f"Final test ({caption}):\n", _md_table(header, rows)]
    rl = rep["silo_dp_sgd"]
    out += ["## DP-SGD inside silos\n", (_md_table(list(rl["summary"]), [tuple(rl["summary"].values())])
                                         if rl["used"] else "") + rl["note"] + "\n"]
    if "audit" in rep:
        out += ["## Leakage audit\n", _md_table(["figure", "value"], [(k, v) for k, v in rep["audit"].items()])]
    if "canary_audit" in rep:
        out += ["## Empirical ε (canary audit)\n", _md_table(["figure", "value"], _canary_rows(rep["canary_audit"]))]
    out += ["## Trust model\n", "".join(f"- **{t['party']}**: {t['statement']}\n" for t in rep["trust_model"])]
    if rep["accounting_method"]:
        out += ["\n## How ε was computed\n", rep["accounting_method"] + "\n"]
    return "\n".join(out)


def plots(rep: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: 'main' (ε beside utility), 'hist' (each silo's DP-SGD ε). Lazy matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures: dict[str, str] = {}
    hist, util = rep["epsilon_history"], rep["utility"]
    panels = (["eps"] if hist and hist["rdp"] else []) + (["util"] if util else [])
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "eps":
                ax.plot(*zip(*hist["rdp"]), label="RDP", color="#1f5fa8", lw=2)
                if hist["pld"]:
                    ax.plot(*zip(*hist["pld"]), label="PLD", color="#d9822b", lw=2, marker="." if hist[
                        "pld_subsampled_rounds"] or len(hist["pld"]) < 30 else None)
                if rep["budget"]["target_epsilon"]:
                    ax.axhline(rep["budget"]["target_epsilon"], ls="--", color="#b3261e", label="target ε")
                ax.set(title=f"ε over rounds (δ = {rep['epsilon']['delta']:g})", xlabel="round", ylabel="ε")
                top = max([p[1] for p in hist["rdp"] + hist["pld"]] + [rep["budget"]["target_epsilon"] or 0])
                ax.set_ylim(0, top * 1.12)
            else:
                for phase, style in (("valid", dict(marker="o", color="#2e7d32")),
                                     ("test", dict(marker="*", ms=14, ls="none", color="#6a1b9a"))):
                    pts = [(u["round"], u["ndcg@10"]) for u in util if u["phase"] == phase and u["ndcg@10"] is not None]
                    if pts:
                        ax.plot(*zip(*pts), label=phase, **style)
                ax.set(title="Utility: NDCG@10", xlabel="round", ylabel="NDCG@10")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.margins(x=0.05, y=0.12)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=9)
        figures["main"] = _png(fig, plt)
    rl = rep["silo_dp_sgd"]
    if rl["used"] and rl["client_epsilons"]:
        fig, ax = plt.subplots(figsize=(5.6, 3.2))
        ax.hist(rl["client_epsilons"], bins=min(20, max(5, len(rl["client_epsilons"]) // 2)), color="#1f5fa8",
                edgecolor="white")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title="Silo DP-SGD: ε per silo (one user)", xlabel="ε", ylabel="silos")
        figures["hist"] = _png(fig, plt)
    return figures


def _png(fig: Any, plt: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;
max-width:1140px;margin:24px auto;padding:0 20px}h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;
margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}.meta{color:#666;font-size:13px}
.box{border-radius:8px;padding:16px 20px;margin:16px 0}.ok{background:#eef5fc;border:1px solid #9cc0e6}
.bad{background:#fdecea;border:2px solid #b3261e;color:#8c1d18;font-weight:600;font-size:18px}
.warn{background:#fff4e0;border:1px solid #e6a23c;color:#7a4a00;padding:10px 16px;margin:8px 0;border-radius:6px}
.figs{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}.big{font-size:26px;font-weight:700;margin-right:28px}
.cols{display:flex;gap:48px;flex-wrap:wrap;align-items:flex-start}.cols h2{margin-top:12px}
.figs img{max-width:100%;height:auto;border:1px solid #eee}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:5px 12px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}footer{margin-top:32px;color:#555;font-size:13px;
border-top:1px solid #ddd;padding-top:8px}"""


_NUMBER = re.compile(r"[-+.\deE]+")


def _html_table(header: list[str], rows: list[tuple], *, align: bool = True) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if align and _NUMBER.fullmatch(_fmt(c)) else ''}>"
                                    f"{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(rep: dict[str, Any], plots: dict[str, str]) -> str:
    e, esc = rep["epsilon"], html.escape
    parts = [f"<h1>Privacy report: run {esc(rep['run']['id'])}</h1>",
             f"<div class=meta>Generated {esc(rep['run']['generated_at'])} from {esc(rep['run']['path'])}</div>"]
    if e:
        parts.append(f"<div class='box ok'><span class=big>ε = {_eps(e['rdp'])}</span>"
                     f"<span class=big>δ = {esc(_fmt(e['delta']))}</span><span class=big>"
                     f"{rep['parameters']['rounds_released']} rounds released</span><p>{esc(rep['guarantee'])}</p>"
                     f"<div class=meta>{esc(rep['mechanism'])}</div></div>")
    else:
        parts.append(f"<div class='box bad'>{esc(rep['guarantee'])}</div>")
    parts += [f"<div class=warn><b>WARNING:</b> {esc(w)}</div>" for w in rep["warnings"]]
    imgs = "".join(f"<img alt='{k}' src='data:image/png;base64,{v}'>" for k, v in plots.items() if k == "main")
    parts.append(f"<div class=figs>{imgs}</div>" if imgs else "")
    parts += ["<h2>What is claimed</h2>", _html_table(["", "statement"], claim_rows(rep), align=False)]
    parts += ["<h2>Parameters</h2>", _html_table(["parameter", "value"], _param_rows(rep), align=False)]
    cols = []
    if rep["epsilon_history"]:
        cols.append("<h2>ε over rounds</h2>" + _html_table(["round", "ε (RDP)", "ε (PLD)"], _eps_rows(rep)))
    cols.append("<h2>Utility</h2>" + _html_table(["round", "phase", "NDCG@10", "Recall@10"],
                                                 [(u["round"], _phase(u), u["ndcg@10"], u["recall@10"])
                                                  for u in rep["utility"]]))
    if rep["final_test"]:
        header, rows, caption = _final_table(rep["final_test"])
        cols.append(f"<h2>Final test</h2><p>{esc(caption)}</p>" + _html_table(header, rows))
    parts.append("<div class=cols>" + "".join(f"<div>{c}</div>" for c in cols) + "</div>")
    rl = rep["silo_dp_sgd"]
    parts.append("<h2>DP-SGD inside silos</h2>")
    if rl["used"]:
        parts.append(_html_table(list(rl["summary"]), [tuple(rl["summary"].values())]))
        if "hist" in plots:
            parts.append(f"<div class=figs><img alt=hist src='data:image/png;base64,{plots['hist']}'></div>")
    parts.append(f"<p>{esc(rl['note'])}</p>")
    if "audit" in rep:
        parts += ["<h2>Leakage audit</h2>", _html_table(["figure", "value"], list(rep["audit"].items()), align=False)]
    if "canary_audit" in rep:
        parts += ["<h2>Empirical ε (canary audit)</h2>",
                  _html_table(["figure", "value"], _canary_rows(rep["canary_audit"]), align=False)]
    trust = [(t["party"], t["statement"]) for t in rep["trust_model"]]
    parts += ["<h2>Trust model: who sees what</h2>", _html_table(["party", "what it sees / what is covered"], trust)]
    if rep["accounting_method"]:
        parts.append(f"<footer><b>How ε was computed.</b> {esc(rep['accounting_method'])}</footer>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Privacy report "
            f"{esc(rep['run']['id'])}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _canary_rows(audit: dict[str, Any]) -> list[tuple[str, Any]]:
    """The canary audit as the report shows it: accounted and empirical ε side by side."""
    return [("accounted ε (this run's ledger)", audit.get("accounted_epsilon")),
            ("empirical ε (Andrew et al. 2023)", audit.get("empirical_epsilon")),
            (f"{audit.get('confidence', 0.95):.0%} interval", f"{audit.get('empirical_low')}-{audit.get('empirical_high')}"),
            ("lower confidence bound", audit.get("empirical_lower_bound")),
            ("flagged (lower bound above the accounted ε)", audit.get("flagged")),
            ("canaries inserted / held out", audit.get("canaries")),
            ("rounds", audit.get("rounds")), ("what the auditor observed", audit.get("observation"))]
