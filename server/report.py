"""The privacy report of a run: what was released, under which guarantee, and at what utility.

:func:`build_report` reads a run directory (``config.json``, ``metrics.jsonl``, ``ledger.json``
and, when present, ``client_epsilons.json`` and ``audit.json``) and returns a JSON-ready dict;
:func:`write_report` writes it as ``privacy_report.{json,md,html}``. The HTML is one
self-contained file (plots are inline PNGs). ε is recomputed from the ledger, never copied
from the metrics. matplotlib is imported only when plotting (edge clients do not ship it).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.privacy import RDP_ORDERS, Accountant, PrivacyLedger
from common.privacy.analysis import PLD_VALUE_DISCRETIZATION_INTERVAL
from common.serialization import read_jsonl, write_json

NO_DP = "NO DIFFERENTIAL PRIVACY GUARANTEE: this model was trained without DP; ε is infinite."
MECHANISM = "user-level DP-FedAvg, Gaussian, Poisson sampling"
LOCAL_MECHANISM = "local DP: each device adds Gaussian noise to its own clipped update (Poisson sampling, no amplification claimed)"
LOCAL_SAMPLING = ("Poisson, each client independently with probability q; NOT used in the accounting: every "
                  "round is charged to every user, as if each took part in all of them")
SAMPLING = ("Poisson, each client independently with probability q; "
            "amplification by subsampling is used in the accounting")
PLD_FULL_HISTORY_MAX_ROUNDS = 300  # a full PLD history costs ~6 s at 300 rounds, growing with rounds
PLD_HISTORY_POINTS = 50
FILES = ("privacy_report.json", "privacy_report.md", "privacy_report.html")


def build_report(run_dir: Path) -> dict[str, Any]:
    """The report's content as a JSON-serialisable dict (see the module docstring)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.json'} not found: not a run directory")
    raw = json.loads((run_dir / "config.json").read_text())
    flat = {**RunConfig().to_flat(), **raw}  # read raw: keys added later (secagg.*) are not refused
    rows = read_jsonl(run_dir / "metrics.jsonl")
    stored = _load_ledger(run_dir)
    # A config written before DP existed has no dp.enabled: then only a ledger is evidence of DP.
    dp_on = bool(raw["dp.enabled"]) if "dp.enabled" in raw else stored is not None
    stored = stored if dp_on else None
    ledger = PrivacyLedger.from_state_dict(stored["ledger"]) if stored else None
    secure = stored.get("secure_noise", int(flat["dp.noise-seed"]) < 0) if stored else None
    population = stored.get("population", "unknown") if stored else "unknown"
    per_user = flat["fed.partition"] == "user"
    local = dp_on and flat.get("dp.mode", "central") == "local"
    # Without DP every trained round released an un-noised model.
    rounds_released = (len({e.round for e in ledger.events}) if ledger else
                       sum(r.get("kind") == "fit" for r in rows))
    warnings: list[str] = []
    if dp_on and ledger is None:
        warnings.append("DP was enabled but the privacy ledger (ledger.json) is missing: ε cannot be computed.")
    if secure is False:
        warnings.append(f"SEEDED NOISE (dp.noise-seed={flat['dp.noise-seed']}): the noise is reproducible by "
                        "anyone who knows the seed. For tests and debugging only, NOT for production.")
    if ledger and isinstance(population, int) and ledger.delta >= 1 / population:
        warnings.append(f"δ = {ledger.delta:g} is not below 1/N = {1 / population:.3g}: the guarantee is weak.")
    stop = next((r for r in rows if r.get("kind") == "stop"), None)
    report: dict[str, Any] = {
        "run": {"id": run_dir.resolve().name, "path": str(run_dir.resolve()),
                "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        "dp_enabled": dp_on,
        "mechanism": (LOCAL_MECHANISM if local else MECHANISM) if dp_on else None,
        "dp_mode": (flat.get("dp.mode", "central") if dp_on else None),
        "parameters": {
            "noise_multiplier": flat["dp.noise-multiplier"] if dp_on else None,
            "clip": flat["dp.clip"] if dp_on else None,
            "sample_rate": flat["fed.sample-rate"],
            "delta": ledger.delta if ledger else None,
            "rounds_configured": flat["fed.rounds"],
            "rounds_released": rounds_released,
            "events": len(ledger.events) if ledger else 0,
            "population": population,
            "accountant": flat["dp.accountant"] if dp_on else None,
            "sampling": (LOCAL_SAMPLING if local else SAMPLING) if dp_on else
            "Poisson, each client independently with probability q",
            "neighbouring": ("any two data sets of one device (local DP: sensitivity 2C)" if local else
                             "add/remove one user's entire data" if per_user else
                             "add/remove one client's entire data (a silo of many users: covers any one user)")
            if dp_on else None,
            "noise_source": None if secure is None else
            ("secure: os.urandom CSPRNG" if secure else "SEEDED (reproducible; NOT for production)"),
            "secure_aggregation": bool(flat.get("secagg.enabled", False)),
            "partition": flat["fed.partition"],
        },
        "warnings": warnings,
        "epsilon": None, "epsilon_history": None,
        "budget": None,
        "utility": [{"round": r["round"], "phase": r.get("phase"), "ndcg@10": r.get("ndcg@10"),
                     "recall@10": r.get("recall@10")} for r in rows if r.get("kind") == "eval"],
        "final_test": next(({k: v for k, v in r.items() if k not in ("kind", "phase", "failures")}
                            for r in reversed(rows) if r.get("kind") == "eval" and r.get("phase") == "test"), None),
        "record_level": _record_level(run_dir),
        "trust_model": _trust_model(dp_on, bool(flat.get("secagg.enabled", False)), per_user, local),
        "accounting_method": None,
    }
    if ledger is not None:
        # every array the ledger charged (MF: item embeddings and biases; hybrid: + head, LoRA)
        report["parameters"]["released_arrays"] = list(dict.fromkeys(n for e in ledger.events for n in e.parameters))
        eps = {"rdp": ledger.epsilon(Accountant.RDP), "pld": ledger.epsilon(Accountant.PLD), "delta": ledger.delta}
        report["epsilon"] = eps
        report["epsilon_history"] = _histories(ledger)
        target = float(flat["dp.target-epsilon"]) or None
        report["budget"] = {"target_epsilon": target, "accountant": flat["dp.accountant"],
                            "stopped_before_round": stop["round"] if stop else None,
                            "reason": stop.get("reason") if stop else None}
        released = ("each update its device sent, and hence the item model after each of "
                    f"{rounds_released} rounds," if local else
                    f"everything released (the item model after each of {rounds_released} rounds)")
        report["guarantee"] = (f"For any one {'user' if per_user else 'client (silo)'}, {released} is "
                               f"(ε = {_eps(eps['rdp'])}, δ = {ledger.delta:g})-differentially private (RDP; "
                               f"PLD gives ε = {_eps(eps['pld'])}).")
        report["accounting_method"] = (
            f"ε is recomputed from the privacy ledger with Google's dp-accounting: RDP over Opacus' orders "
            f"(α = {RDP_ORDERS[0]:g}…{RDP_ORDERS[-1]:g}, {len(RDP_ORDERS)} orders) and PLD (pessimistic, value "
            f"grid {PLD_VALUE_DISCRETIZATION_INTERVAL:g}), composing " + (
                "one Gaussian mechanism per round with multiplier σ/2 (the device's noise σC over sensitivity "
                f"2C; no amplification by sampling) over all {rounds_released} rounds, at δ = {ledger.delta:g}. "
                "Conservative: a user is charged for every round, also those it did not take part in; each "
                "device also keeps its own ledger of the rounds it actually reported in." if local else
                f"one Poisson-subsampled Gaussian mechanism (σ, q) per release over all {rounds_released} "
                f"released rounds, at δ = {ledger.delta:g}. "
                "Rounds where nobody reported still released noise and are charged."))
    else:
        report["guarantee"] = NO_DP if not dp_on else "NO VERIFIABLE GUARANTEE: the privacy ledger is missing."
    audit = run_dir / "audit.json"
    if audit.is_file():
        report["audit"] = json.loads(audit.read_text())
    return report


def write_report(run_dir: Path) -> list[Path]:
    """Write ``privacy_report.{json,md,html}`` into ``run_dir``; returns the three paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    paths = [run_dir / name for name in FILES]
    write_json(paths[0], report)
    paths[1].write_text(to_markdown(report))
    paths[2].write_text(to_html(report, _plots(report)))
    return paths


# ---------------------------------------------------------------- content
def _load_ledger(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "ledger.json"
    if path.is_file():
        return json.loads(path.read_text())
    # Runs written before ledger.json existed kept the ledger in the checkpoint only.
    ckpt = run_dir / "checkpoint.json"
    state = json.loads(ckpt.read_text()).get("ledger") if ckpt.is_file() else None
    return {"ledger": state} if state else None


def _histories(ledger: PrivacyLedger) -> dict[str, Any]:
    """ε after each released round (RDP: every round; PLD: every round up to 300, else ~50 points)."""
    rdp = ledger.epsilon_history(Accountant.RDP)
    rounds = [r for r, _ in rdp]
    if len(rounds) <= PLD_FULL_HISTORY_MAX_ROUNDS:
        pld, sampled = ledger.epsilon_history(Accountant.PLD), False
    else:  # each point composes a prefix afresh (self-composition of merged rounds is fast)
        picks = sorted({rounds[round(i * (len(rounds) - 1) / (PLD_HISTORY_POINTS - 1))]
                        for i in range(PLD_HISTORY_POINTS)})
        pld, sampled = [], True
        for r in picks:
            prefix = PrivacyLedger(delta=ledger.delta, neighbouring=ledger.neighbouring)
            for event in ledger.events:
                if event.round <= r:
                    prefix.record(event)
            pld.append((r, prefix.epsilon(Accountant.PLD)))
    return {"rdp": [list(p) for p in rdp], "pld": [list(p) for p in pld], "pld_subsampled_rounds": sampled}


def _record_level(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "client_epsilons.json"
    if not path.is_file():
        return {"used": False, "note": "record-level (per-rating) DP-SGD inside silos: not used in this run"}
    data = json.loads(path.read_text())
    v = sorted(float(x) for x in (data.values() if isinstance(data, dict) else data))
    return {"used": True, "client_epsilons": v,
            "summary": {"clients": len(v), "min": v[0], "median": v[len(v) // 2], "max": v[-1]}
            if v else {"clients": 0},
            "note": "record-level ε of each silo's DP-SGD (one rating's neighbour): not a user-level guarantee"}


def _trust_model(dp_on: bool, secagg: bool, per_user: bool, local: bool = False) -> list[dict[str, str]]:
    holder = "The device" if per_user else "Each silo (client)"
    update = ("clipped and locally noised update (L2 ≤ C, then + N(0, (σC)²) per coordinate)" if local else
              "clipped update (L2 ≤ C)" if dp_on else "update (not clipped: DP is off)")
    server = (f"sees only the sum of masked updates (secure aggregation), never one client's {update}"
              if secagg else f"sees each sampled client's {update} in plaintext (no secure aggregation)")
    model = ("covered by the (ε, δ) guarantee against anyone who sees it, including other users"
             if dp_on else "covered by no formal guarantee: it may reveal a user's ratings")
    return [
        {"party": "device", "statement": f"{holder} keeps its raw ratings and user embedding(s): they never "
                                         f"leave it. It sends only its {update} and a few metrics"
                                         + (" (never its training loss)." if local else ".")},
        {"party": "server", "statement": f"The server {server}; it also sees plaintext metrics per client: "
                                         + ("" if local else "training loss, ")
                                         + "evaluation metric sums and user counts."},
        {"party": "released model", "statement": f"The item embeddings and biases after each round are {model}."},
        {"party": "not covered", "statement": (
            ("Local DP: the server is NOT trusted with the noise; each update the server could see is itself "
             "(ε, δ)-DP; " if local else "The server is trusted to add the noise (central DP); ")
            + "per-client metrics are not noised; timing and participation metadata "
              "(who was sampled, who reported, when) are not protected."
            if dp_on else "Nothing: without DP no release is protected.")},
    ]


# ---------------------------------------------------------------- rendering
def _fmt(x: Any) -> str:
    if x is None or isinstance(x, bool):
        return {None: "—", True: "on", False: "off"}[x]
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _eps(x: float) -> str:
    """ε for display, rounded UP to 3 decimals (rounding a guarantee down would overstate it)."""
    return f"{math.ceil(x * 1000) / 1000:.3f}"


def _param_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    p, names = rep["parameters"], {
        "noise_multiplier": "noise multiplier σ", "clip": "clip norm C (L2, whole update)",
        "sample_rate": "sample rate q", "delta": "δ", "rounds_configured": "rounds configured",
        "rounds_released": "rounds released", "population": "population N", "accountant": "enforcing accountant",
        "sampling": "sampling", "neighbouring": "neighbouring relation", "noise_source": "noise source",
        "secure_aggregation": "secure aggregation", "partition": "partition"}
    rows = [(label, _fmt(p[key])) for key, label in names.items()]
    if p.get("released_arrays"):
        released = p["released_arrays"]
        lora = [n for n in released if n.startswith("lora.")]
        shown = [n for n in released if not n.startswith("lora.")] + ([f"{len(lora)} LoRA arrays (lora.*)"] if lora else [])
        rows.append(("released arrays (covered by ε)", ", ".join(shown)))
    if rep["budget"]:
        b = rep["budget"]
        rows.append(("target ε", _fmt(b["target_epsilon"]) if b["target_epsilon"] else "none"))
        if b["stopped_before_round"]:
            rows.append(("budget stop", f"stopped before round {b['stopped_before_round']} ({b['reason']})"))
    return rows


def _eps_rows(rep: dict[str, Any], limit: int = 12) -> list[tuple[int, str, str]]:
    rdp, pld = dict(map(tuple, rep["epsilon_history"]["rdp"])), dict(map(tuple, rep["epsilon_history"]["pld"]))
    rounds = sorted(pld) if len(pld) <= limit else [sorted(pld)[round(i * (len(pld) - 1) / (limit - 1))]
                                                     for i in range(limit)]
    return [(r, _eps(rdp[r]) if r in rdp else "—", _eps(pld[r])) for r in dict.fromkeys(rounds)]


def _final_table(ft: dict[str, Any]) -> tuple[list[str], list[tuple], str]:
    """Final test metrics as rows of metrics by columns of cut-offs (``ndcg@10`` -> row ndcg, column @10)."""
    ks = sorted({int(k.split("@")[1]) for k in ft if "@" in k})
    names = sorted({k.split("@")[0] for k in ft if "@" in k})
    rows = [(n, *(ft.get(f"{n}@{k}") for k in ks)) for n in names]
    return ["metric", *(f"@{k}" for k in ks)], rows, f"round {ft.get('round')}, {ft.get('users')} users"


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
    out += ["## Parameters\n", _md_table(["parameter", "value"], _param_rows(rep))]
    if rep["epsilon_history"]:
        out += ["## ε over rounds\n", _md_table(["round", "ε (RDP)", "ε (PLD)"], _eps_rows(rep))]
    out += ["## Utility\n", _md_table(["round", "phase", "NDCG@10", "Recall@10"],
                                      [(u["round"], u["phase"], u["ndcg@10"], u["recall@10"]) for u in rep["utility"]])]
    if rep["final_test"]:
        header, rows, caption = _final_table(rep["final_test"])
        out += [f"Final test ({caption}):\n", _md_table(header, rows)]
    rl = rep["record_level"]
    out += ["## Record-level DP (silos)\n", (_md_table(list(rl["summary"]), [tuple(rl["summary"].values())])
                                            if rl["used"] else "") + rl["note"] + "\n"]
    if "audit" in rep:
        out += ["## Leakage audit\n", _md_table(["figure", "value"], [(k, v) for k, v in rep["audit"].items()])]
    out += ["## Trust model\n", "".join(f"- **{t['party']}**: {t['statement']}\n" for t in rep["trust_model"])]
    if rep["accounting_method"]:
        out += ["\n## How ε was computed\n", rep["accounting_method"] + "\n"]
    return "\n".join(out)


def _plots(rep: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: 'main' (ε beside utility), 'hist' (record-level ε). Lazy matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots: dict[str, str] = {}
    hist, util = rep["epsilon_history"], rep["utility"]
    panels = (["eps"] if hist and hist["rdp"] else []) + (["util"] if util else [])
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            if panel == "eps":
                ax.plot(*zip(*hist["rdp"]), label="RDP", color="#1f5fa8", lw=2)
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
        plots["main"] = _png(fig, plt)
    rl = rep["record_level"]
    if rl["used"] and rl["client_epsilons"]:
        fig, ax = plt.subplots(figsize=(5.6, 3.2))
        ax.hist(rl["client_epsilons"], bins=min(20, max(5, len(rl["client_epsilons"]) // 2)), color="#1f5fa8",
                edgecolor="white")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title="Record-level ε per client", xlabel="ε", ylabel="clients")
        plots["hist"] = _png(fig, plt)
    return plots


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
    parts += ["<h2>Parameters</h2>", _html_table(["parameter", "value"], _param_rows(rep), align=False)]
    cols = []
    if rep["epsilon_history"]:
        cols.append("<h2>ε over rounds</h2>" + _html_table(["round", "ε (RDP)", "ε (PLD)"], _eps_rows(rep)))
    cols.append("<h2>Utility</h2>" + _html_table(["round", "phase", "NDCG@10", "Recall@10"],
                                                 [(u["round"], u["phase"], u["ndcg@10"], u["recall@10"])
                                                  for u in rep["utility"]]))
    if rep["final_test"]:
        header, rows, caption = _final_table(rep["final_test"])
        cols.append(f"<h2>Final test</h2><p>{esc(caption)}</p>" + _html_table(header, rows))
    parts.append("<div class=cols>" + "".join(f"<div>{c}</div>" for c in cols) + "</div>")
    rl = rep["record_level"]
    parts.append("<h2>Record-level DP (silos)</h2>")
    if rl["used"]:
        parts.append(_html_table(list(rl["summary"]), [tuple(rl["summary"].values())]))
        if "hist" in plots:
            parts.append(f"<div class=figs><img alt=hist src='data:image/png;base64,{plots['hist']}'></div>")
    parts.append(f"<p>{esc(rl['note'])}</p>")
    if "audit" in rep:
        parts += ["<h2>Leakage audit</h2>", _html_table(["figure", "value"], list(rep["audit"].items()), align=False)]
    trust = [(t["party"], t["statement"]) for t in rep["trust_model"]]
    parts += ["<h2>Trust model: who sees what</h2>", _html_table(["party", "what it sees / what is covered"], trust)]
    if rep["accounting_method"]:
        parts.append(f"<footer><b>How ε was computed.</b> {esc(rep['accounting_method'])}</footer>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Privacy report "
            f"{esc(rep['run']['id'])}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
