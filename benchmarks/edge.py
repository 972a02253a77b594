"""The device footprint of fedrec: install size, memory of a training round, recommend latency.

a. Installed size of ``fedrec[client]``: the requirement closure of ``fedrec[client]`` resolved
   against THIS venv's installed distributions (``importlib.metadata``), and the summed size on
   disk of the files each one's RECORD lists. An ESTIMATE from this venv: a device's resolver may
   pick other versions/wheels (e.g. a CPU-only torch without CUDA libraries).
b. Peak RSS (``VmHWM`` of a fresh subprocess, MEASURED; not ``ru_maxrss``, which a child
   starts at its parent's peak) of one training round as a device:
   a DeviceStore holding one ML-100K user's ratings, the global model loaded, then
   ``common.models.mf.model.client_train`` + ``clip_grouped`` (MF only); and, in another fresh
   subprocess, the same plus the LM side (``TextItemEncoder(dim, lora=True)`` and
   ``common.models.hybrid.train.adapter_update`` on the user's positives + negatives).
c. ``fedrec-client recommend --k 10 --timing`` on a 1,682-item model (a run dir under
   /tmp/runs with model.safetensors + items.csv, else a quick ``train_central``): the computation
   as ``--timing`` reports it, the wall time of the process and its peak RSS (``wait4`` in a small
   launcher, so the parent's memory is not counted), for the
   first call (user vector fitted: torch imported, its import time excluded as --timing does)
   and the second (vector cached: NumPy only).

    python benchmarks/edge.py [--json runs/edge.json] [--model-dir RUN_DIR] [--user 0] [--no-lora]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python benchmarks/X.py` puts benchmarks/ on sys.path, not the checkout, and opacus installs a
# top-level package `benchmarks` of its own: the checkout goes first, so `benchmarks.*` is ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402

TARGET_MF_ROUND_RSS_MB = 300.0
TARGET_RECOMMEND_MS = 200.0
TARGET_HYBRID_ROUND_RSS_MB = 400.0
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- a. install size

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str = "fedrec", extras: tuple[str, ...] = ("client",)) -> dict[str, md.Distribution]:
    """Distributions installed here that ``root[extras]`` needs, transitively (markers evaluated)."""
    from packaging.requirements import Requirement

    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    seen: dict[str, md.Distribution] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    done: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, ext = todo.pop()
        key = _norm(name)
        dist = installed.get(key)
        if dist is None or (key, ext) in done:
            continue
        done.add((key, ext))
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            envs = [{"extra": e} for e in ext] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
                continue
            if _norm(req.name) == key:  # fedrec[sim] -> fedrec[client,server]: not needed for [client]
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return seen


def dist_size(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        try:
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def install_size() -> tuple[list[tuple[str, str, int]], int]:
    closure = requirement_closure()
    rows = sorted(((d.metadata["Name"], d.version, dist_size(d)) for d in closure.values()), key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


# ---------------------------------------------------------------- model and one user

def find_model(explicit: Path | None, work: Path) -> tuple[Path, str]:
    if explicit is not None:
        return explicit, "given"
    for d in sorted(Path("/tmp/runs").glob("*"), reverse=True) if Path("/tmp/runs").is_dir() else []:
        model, items = d / "model.safetensors", d / "items.csv"
        if model.is_file() and items.is_file():
            with items.open() as fh:
                n = sum(1 for _ in fh) - 1
            cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
            if n == 1682 and cfg.get("model.kind", "mf") == "mf":
                return d, f"run dir {d}"
    # a quick central model
    from common.central import train_central
    from common.config import RunConfig
    from common.data import load_interactions
    from common.data.splits import split_interactions
    from common.models.mf.model import model_file
    from server.run_dir import RunDir

    cfg = RunConfig().replace(**{"central.epochs": 4})
    data = load_interactions(cfg.data.source, cfg.data.format, None)
    split = split_interactions(data, cfg.data.split, seed=cfg.data.seed, cold_fraction=cfg.data.cold_fraction)
    res = train_central(split, cfg.model, cfg.central, seed=cfg.seed, progress=False)
    run = RunDir.create(work / "central", cfg)
    run.save_model(*model_file(res.params))
    run.save_items(tuple(data.item_ids), [i.title for i in data.items])
    return run.path, "train_central, 4 epochs"


def write_user(user: int, path: Path) -> int:
    from common.data import load_interactions

    data = load_interactions("ml-100k", "auto", None)
    rows = [i for i in range(len(data.user)) if int(data.user[i]) == user]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item", "rating", "timestamp"])
        for i in rows:
            w.writerow([data.item_ids[int(data.item[i])], float(data.rating[i]), float(data.timestamp[i])])
    return len(rows)


# ---------------------------------------------------------------- b. a training round, in a child

def _round_child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    t0 = time.perf_counter()
    import numpy as np

    from client.recommend import load_model_files
    from client.store import DeviceStore
    from common.config import ModelConfig
    from common.models import ItemParams
    from common.models.mf.model import client_train
    from common.privacy.dp_fedavg import clip_grouped

    out: dict[str, Any] = {}
    def rss() -> float:
        """This process's own peak RSS (VmHWM): ru_maxrss would start at the parent's peak."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    out["rss_after_imports_mb"] = rss()
    model = load_model_files(spec["model"], spec["items"])
    with DeviceStore(spec["db"]) as store:
        store.set_catalog(model.item_ids, model.titles)
        store.import_ratings(spec["ratings"])
        data = store.client_data(model.index())
    params = ItemParams(model.embeddings, model.bias)
    cfg = ModelConfig(**({"loss": model.loss} if model.loss else {}))
    t1 = time.perf_counter()
    update, loss, vectors = client_train(params, data, model=cfg, epochs=1, lr=1.0, seed=0, server_round=1)
    arrays = clip_grouped(update.to_arrays(), 1.0, 0.05)
    out["mf_train_seconds"] = time.perf_counter() - t1
    out["update_norm"] = float(np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays)))
    out["positives"] = int(len(data.train[0].items))
    out["mf_rss_mb"] = rss()
    if spec.get("hybrid"):
        # the device's own path (client/app.py): the hybrid built from the texts the store keeps,
        # the text vectors as the server sends them, one device step
        from common.models import build_model

        texts = spec["texts"]  # what the items file's text column brings to the device
        with DeviceStore(spec["db"]) as store:
            store.set_item_texts(model.item_ids, texts)
            kept = store.item_texts()
        hcfg = ModelConfig(kind="hybrid", dim=params.dim, **({"loss": model.loss} if model.loss else {}))
        t2 = time.perf_counter()
        hybrid = build_model(hcfg, n_items=params.n_items, seed=0, texts=lambda: kept)
        out["hybrid_text_side_seconds"] = time.perf_counter() - t2
        hparams = hybrid.init(0)
        hparams = hybrid.with_arrays(hparams, [params.embeddings, params.bias, *hybrid.arrays(hparams)[2:]])
        t3 = time.perf_counter()
        step = hybrid.train(hparams, hybrid.context(hparams), data, epochs=1, lr=1.0, seed=0, server_round=1)
        hybrid.clip(step.update, 1.0, 0.05)
        out["hybrid_train_seconds"] = time.perf_counter() - t3
        out["hybrid_rss_mb"] = rss()
    if spec.get("lora"):
        try:
            from common.models.hybrid.encoder import TextItemEncoder, tokenize
            from common.models.hybrid.train import adapter_update
        except ImportError as exc:
            out["lora_error"] = f"unavailable: {exc}"
        else:
            from common.data import load_interactions
            from common.models import UserData

            texts = load_interactions("ml-100k", "auto", None).item_texts()
            t2 = time.perf_counter()
            encoder = TextItemEncoder(cfg.dim, lora=True, seed=0)
            tokens = tokenize(texts, cfg.text_max_length)
            user = data.train[0]
            rng = np.random.default_rng(0)
            k = min(cfg.text_positives, len(user.items))
            pick = np.sort(rng.choice(len(user.items), k, replace=False))
            delta, lm_loss = adapter_update(encoder, params, UserData(user.items[pick], user.ratings[pick]), tokens,
                                            user_vector=vectors[0], negatives_rng=rng, n_neg=cfg.text_negatives,
                                            lr=cfg.text_lr, epochs=1)
            out["lora_seconds"] = time.perf_counter() - t2
            out["lora_update_params"] = int(sum(v.size for v in delta.values()))
            out["lora_positives"] = int(k)
            out["lora_rss_mb"] = rss()
    out["child_seconds"] = time.perf_counter() - t0
    return out


def run_round_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / f"spec-{int(bool(spec.get('lora')))}{int(bool(spec.get('hybrid')))}-{Path(spec['db']).stem}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--round-child", str(spec_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               **({"FEDREC_CACHE": spec["cache"]} if spec.get("cache") else {})})
    if proc.returncode != 0 or not out_path.is_file():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------- c. recommend

def client_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fedrec-client"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "client.cli"]


# A child's ``ru_maxrss`` starts at its parent's peak (Linux keeps the high-water mark across
# fork + exec), so a command started straight from this (large) process would report at least
# this process's memory. It is started from a small launcher instead, which reports the command's
# own peak: what the launcher holds (a bare interpreter, ~10 MB) is below any fedrec command's.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "print(f'\\nFEDREC_CHILD_MAXRSS_KB={usage.ru_maxrss}', file=sys.stderr)\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(cmd: list[str], work: Path) -> tuple[int, str, float, float]:
    """Exit status, stdout, wall seconds and peak RSS (MB: the command's own, see _LAUNCHER)."""
    out_file = work / "cmd.out"
    with out_file.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
    text = out_file.read_text()
    m = re.search(r"\nFEDREC_CHILD_MAXRSS_KB=(\d+)\n?", text)
    rss = int(m.group(1)) / 1024 if m else math.nan
    return proc.returncode, text[:m.start()] if m else text, wall, rss


def parse_timing(text: str) -> dict[str, float]:
    m = re.search(r"timing: ([\d.]+) ms \(load ([\d.]+) ms, user vector ([\d.]+) ms (\w+)(?:, after ([\d.]+) ms importing torch)?"
                  r".*rank ([\d.]+) ms\)", text)
    if not m:
        return {}
    out = {"ms": float(m.group(1)), "load_ms": float(m.group(2)), "user_ms": float(m.group(3)),
           "rank_ms": float(m.group(6))}
    if m.group(5):
        out["torch_import_ms"] = float(m.group(5))
    return out


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--model-dir", type=Path, help="a run dir with model.safetensors + items.csv (1,682 items)")
    parser.add_argument("--user", type=int, default=0, help="ML-100K user index whose ratings the device holds")
    parser.add_argument("--no-lora", action="store_true", help="skip the LM-adapter round")
    parser.add_argument("--round-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.round_child:
        spec = json.loads(args.round_child.read_text())
        Path(spec["out"]).write_text(json.dumps(_round_child(spec)))
        return 0

    t_start = time.perf_counter()
    fig: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedrec-edge-") as tmp:
        work = Path(tmp)
        # a
        sizes, total = install_size()
        fig["install_mb"] = total / 2**20
        fig["install_packages"] = float(len(sizes))
        # model + user
        found, model_src = find_model(args.model_dir, work)
        model_dir = work / "model"  # a private copy: another run may rewrite the one found
        model_dir.mkdir()
        for name in ("model.safetensors", "items.csv", "config.json"):
            if (found / name).is_file():
                shutil.copy2(found / name, model_dir / name)
        ratings = work / "ratings.csv"
        n_ratings = write_user(args.user, ratings)
        fig["user_ratings"] = float(n_ratings)
        # b
        base = {"model": str(model_dir / "model.safetensors"), "items": str(model_dir / "items.csv"),
                "ratings": str(ratings)}
        mf = run_round_child({**base, "db": str(work / "mf.sqlite"), "lora": False}, work)
        fig["mf_round_rss_mb"] = mf.get("mf_rss_mb", math.nan)
        fig["mf_rss_after_imports_mb"] = mf.get("rss_after_imports_mb", math.nan)
        fig["mf_train_seconds"] = mf.get("mf_train_seconds", math.nan)
        from common.config import DataConfig
        from common.data.texts import item_texts

        cache = work / "device-cache"  # the device's own cache of its catalogue's sentence embeddings
        hybrid = {}
        for tag in ("first", "cached"):
            hybrid[tag] = run_round_child({**base, "db": str(work / f"hybrid-{tag}.sqlite"), "hybrid": True,
                                           "cache": str(cache), "texts": list(item_texts(DataConfig()))}, work)
            fig[f"hybrid_round_{tag}_rss_mb"] = hybrid[tag].get("hybrid_rss_mb", math.nan)
            fig[f"hybrid_round_{tag}_seconds"] = hybrid[tag].get("hybrid_train_seconds", math.nan)
            fig[f"hybrid_text_side_{tag}_seconds"] = hybrid[tag].get("hybrid_text_side_seconds", math.nan)
        lora: dict[str, Any] = {}
        if not args.no_lora:
            lora = run_round_child({**base, "db": str(work / "lora.sqlite"), "lora": True}, work)
            fig["lora_round_rss_mb"] = lora.get("lora_rss_mb", math.nan)
            fig["lora_seconds"] = lora.get("lora_seconds", math.nan)
            fig["lora_update_params"] = float(lora.get("lora_update_params", math.nan))
        # c
        db = work / "device.sqlite"
        cli = client_cmd()
        rc, text, _, _ = run_measured([*cli, "--db", str(db), "import", str(ratings), "--items", base["items"]], work)
        if rc != 0:
            print(text, file=sys.stderr)
        rec = [*cli, "--db", str(db), "recommend", "--k", "10", "--timing", "--model", base["model"], "--items",
               base["items"]]
        calls = []
        for label in ("first (vector fitted)", "second (vector cached)"):
            rc, text, wall, peak = run_measured(rec, work)
            t = parse_timing(text)
            calls.append((label, rc, t, wall, peak))
            if rc != 0 or not t:
                print(f"recommend failed ({rc}):\n{text}", file=sys.stderr)
        for tag, (_, rc, t, wall, peak) in zip(("first", "cached"), calls):
            fig[f"recommend_{tag}_ms"] = t.get("ms", math.nan)
            fig[f"recommend_{tag}_wall_ms"] = 1000 * wall
            fig[f"recommend_{tag}_rss_mb"] = peak
            fig[f"recommend_{tag}_torch_import_ms"] = t.get("torch_import_ms", math.nan)
        fig["recommend_ms"] = max(fig["recommend_first_ms"], fig["recommend_cached_ms"])
    fig["benchmark_seconds"] = time.perf_counter() - t_start

    goals = [target("mf_round_rss_mb", fig["mf_round_rss_mb"], "<=", TARGET_MF_ROUND_RSS_MB),
             target("hybrid_round_rss_mb", fig["hybrid_round_cached_rss_mb"], "<=", TARGET_HYBRID_ROUND_RSS_MB),
             target("recommend_ms", fig["recommend_ms"], "<=", TARGET_RECOMMEND_MS)]
    print()
    print(f"a. Installed size of fedrec[client] (ESTIMATE: requirement closure resolved in this venv, "
          f"{sys.prefix}; RECORD files summed)")
    top = sizes[:12]
    rest = sum(s for _, _, s in sizes[12:])
    print(table(["package", "version", "MB"], [[n, v, s / 2**20] for n, v, s in top]
                + [[f"{len(sizes) - 12} others", "", rest / 2**20], ["total", "", total / 2**20]]))
    print()
    print(f"b. One training round as a device (MEASURED VmHWM of a fresh process; model: {model_src}; "
          f"ML-100K user {args.user}, {n_ratings} ratings)")
    rows = [["MF: imports only", mf.get("rss_after_imports_mb", "error"), ""],
            ["MF: store + model + client_train + clip", mf.get("mf_rss_mb", mf.get("error", "error")),
             mf.get("mf_train_seconds", "")]]
    for tag, label in (("first", "embedding the 1,682 texts: once, at import --embed or in the first round"),
                       ("cached", "every round after import --embed")):
        h = hybrid[tag]
        rows.append([f"hybrid, frozen MiniLM + head ({label}; text side {h.get('hybrid_text_side_seconds', '?'):.1f} s)"
                     if "hybrid_text_side_seconds" in h else f"hybrid ({label})",
                     h.get("hybrid_rss_mb", h.get("error", "error")), h.get("hybrid_train_seconds", "")])
    if not args.no_lora:
        rows.append([f"+ LoRA adapter_update ({lora.get('lora_positives', '?')} pos + 32 neg, "
                     f"{lora.get('lora_update_params', '?')} trainable values)",
                     lora.get("lora_rss_mb", lora.get("lora_error", lora.get("error", "error"))),
                     lora.get("lora_seconds", "")])
    print(table(["round", "peak RSS MB", "seconds"], rows))
    print()
    print("c. fedrec-client recommend --k 10 (MEASURED; --timing excludes the torch import; wall = whole process)")
    print(table(["call", "--timing ms", "load ms", "user vector ms", "rank ms", "torch import ms", "wall ms",
                 "peak RSS MB"],
                [[label, t.get("ms", "n/a"), t.get("load_ms", "n/a"), t.get("user_ms", "n/a"), t.get("rank_ms", "n/a"),
                  t.get("torch_import_ms", "-"), 1000 * wall, peak] for label, rc, t, wall, peak in calls]))
    print()
    print(targets_table(goals))
    print("(recommend_ms is the slower of the two calls' --timing figures)")
    print(f"benchmark wall time {fig['benchmark_seconds']:.0f} s")
    if args.json:
        write_json(args.json, fig, goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
