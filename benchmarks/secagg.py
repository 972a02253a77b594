"""The cost of SecAgg+: round time, bytes per client and quality, with and without it, in one run.

a. Speed: ``synthetic:1000`` at q = 0.01 / 0.05 / 0.1 (~10 / 50 / 100 clients per round), each
   with and without SecAgg+ (``secagg.enabled``), differential privacy OFF in both (so the only
   difference is the protocol; under SecAgg+ the client still clips its update to ``dp.clip``,
   which the protocol's quantization range needs). A few rounds each; the median of the per-round
   seconds of rounds 2.. from metrics.jsonl fit rows (round 1 carries Ray's start-up). Each run
   asks for one more round than it measures and stops after the measured ones, so the final
   test evaluation over all clients never starts. Ratio SecAgg+/plain per cohort size.
b. Bytes sent by one client per round: the plain dense update (item embeddings + biases,
   float32) and the SecAgg+ masked vector, both MEASURED by serialising a real update with
   ``flwr.common.ndarray_to_bytes`` exactly as Flower sends it (payload only, no protobuf/gRPC
   framing); the key-setup and share messages MEASURED the same way from Flower's own
   primitives (public keys, encrypted shares, unmask shares) and multiplied by the protocol's
   message counts (num-shares neighbours): an ESTIMATE of the total, as no wire was tapped.
c. Quality: ML-100K, DP on in both with the same seeded noise, the same short run with and without SecAgg+: final test
   NDCG@10 and the difference. Both runs clip to C and add the same seeded noise, so SecAgg+'s
   quantization is the only difference (with DP off only the SecAgg+ path would clip).

Each simulation runs in its own Python process through ``benchmarks.simulation_runs.run_sim``.

    python benchmarks/secagg.py [--json runs/secagg.json] [--rounds 3] [--quality-rounds 6]
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
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.harness import table, target, targets_table, write_json  # noqa: E402
from benchmarks.simulation_runs import NEVER, run_sim  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.serialization import load_arrays  # noqa: E402
from server import simulation  # noqa: E402

log = logging.getLogger("benchmarks.secagg")

TARGET_OVERHEAD_100 = 5.0
TARGET_QUALITY_DIFF = 0.005  # |NDCG@10 with SecAgg+ − without|, same seeded DP noise
COHORTS = (10, 50, 100)
POPULATION = 1000


def config(secagg: bool, **flat: Any) -> RunConfig:
    # DP on in both with the same seeded noise: both paths then clip to C and add the same noise,
    # so the only difference left is SecAgg+'s quantization (DP off would clip only under SecAgg+).
    return RunConfig().replace(**{"dp.enabled": True, "dp.noise-seed": 0, "dp.target-epsilon": 0.0,
                                  "secagg.enabled": secagg, **flat})


# ---------------------------------------------------------------- bytes

def bytes_per_client(n_items: int, dim: int, cfg: RunConfig, cohort: int) -> dict[str, float]:
    """Payload bytes one client uploads (and downloads, for the protocol messages) in one round."""
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_mod
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

    rng = np.random.default_rng(0)
    update = [rng.normal(0, 1e-3, (n_items, dim)).astype(np.float32), rng.normal(0, 1e-3, n_items).astype(np.float32)]
    plain = sum(len(ndarray_to_bytes(a)) for a in update)
    clip, target_range = cfg.dp.clip, 2 ** cfg.secagg.quantization_bits
    mod_range = 2**32  # SecAggPlusWorkflow's default modulus_range (server/app.py leaves it)
    q = factor_combine(1, quantize(update, clip, target_range))
    masked = parameters_mod([a.astype(np.int64) for a in q], mod_range)  # what _mask sends (int64 after mod)
    masked_bytes = sum(len(ndarray_to_bytes(a)) for a in masked)
    dtypes = sorted({str(a.dtype) for a in masked})

    shares = min(cfg.secagg.num_shares, cohort)
    threshold = cfg.secagg.reconstruction_threshold
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    pk = len(public_key_to_bytes(pk1)) + len(public_key_to_bytes(pk2))
    seed = os.urandom(32)
    b_shares = create_shares(seed, threshold, shares)
    sk_shares = create_shares(private_key_to_bytes(sk1), threshold, shares)
    key = generate_shared_key(sk2, generate_key_pairs()[1])
    cipher = len(encrypt(key, share_keys_plaintext_concat(1, 2, b_shares[0], sk_shares[0])))
    setup_up = pk + (shares - 1) * (cipher + 8)  # stage 0: own keys; stage 1: ciphertexts + destination ids
    unmask_up = shares * (len(b_shares[0]) + 8)  # stage 3: a seed share per (surviving) neighbour + node ids
    setup_down = shares * (pk + 8) + (shares - 1) * (cipher + 8)  # neighbours' keys; ciphertexts addressed to it
    return {"plain_upload_bytes": float(plain), "secagg_masked_upload_bytes": float(masked_bytes),
            "secagg_masked_dtype": ",".join(dtypes), "secagg_setup_upload_bytes": float(setup_up),
            "secagg_unmask_upload_bytes": float(unmask_up), "secagg_protocol_download_bytes": float(setup_down),
            "secagg_total_upload_bytes": float(masked_bytes + setup_up + unmask_up),
            "public_keys_bytes": float(pk), "ciphertext_bytes": float(cipher), "share_bytes": float(len(b_shares[0])),
            "neighbours": float(shares)}


def n_items_of(source: str) -> int:
    from common.data import load_interactions
    from common.data.synthetic import is_synthetic_source, synthetic_source

    if is_synthetic_source(source):  # the catalogue, without generating the users
        return synthetic_source(source).n_items
    return int(load_interactions(source, "auto", None).n_items)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per speed run (median of 2..)")
    parser.add_argument("--quality-rounds", type=int, default=6, help="rounds of the ML-100K quality runs")
    parser.add_argument("--quality-q", type=float, default=0.05, help="sample rate of the quality runs")
    parser.add_argument("--num-cpus", type=float, default=0.5)
    parser.add_argument("--runs-dir", type=Path)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per simulation at most")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    simulation.quiet_logs(False)
    logging.getLogger("benchmarks.federated").setLevel(logging.INFO)
    tmp = None
    if args.runs_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedrec-secagg-")
        root = Path(tmp.name)
    else:
        root = args.runs_dir
        root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    fig: dict[str, Any] = {}

    # a. speed
    speed_rows = []
    for cohort in COHORTS:
        q = cohort / POPULATION
        med = {}
        for tag, on in (("plain", False), ("secagg", True)):
            cfg = config(on, **{"data.source": f"synthetic:{POPULATION}", "fed.sample-rate": q,
                                "fed.rounds": args.rounds + 1, "fed.eval-every": NEVER})
            run = run_sim(f"{tag}{cohort}", cfg, root, num_cpus=args.num_cpus, progress=False,
                          stop_after=args.rounds, time_limit=args.time_limit)
            f = run.figures
            med[tag] = f.get("median_round_seconds", math.nan)
            for k in ("median_round_seconds", "round1_seconds", "max_round_seconds", "median_participants_rounds2",
                      "failures", "rounds"):
                fig[f"{tag}{cohort}_{k}"] = f.get(k, math.nan)
            fig[f"{tag}{cohort}_complete"] = float(run.complete)
        ratio = med["secagg"] / med["plain"] if med["plain"] else math.nan
        fig[f"secagg_overhead_{cohort}"] = ratio
        speed_rows.append([f"q={q:g} (~{cohort}/round)", fig[f"plain{cohort}_median_participants_rounds2"],
                           fig[f"secagg{cohort}_median_participants_rounds2"], med["plain"], med["secagg"], ratio,
                           fig[f"plain{cohort}_round1_seconds"], fig[f"secagg{cohort}_round1_seconds"]])

    # b. bytes (ML-100K-sized item side: synthetic users resample ML-100K's items)
    base = RunConfig()
    n_items = n_items_of(f"synthetic:{POPULATION}")
    by = bytes_per_client(n_items, base.model.dim, base, 100)
    fig.update({k: v for k, v in by.items() if not isinstance(v, str)})
    fig["n_items"], fig["dim"] = float(n_items), float(base.model.dim)
    fig["formula_plain_bytes"] = float(n_items * (base.model.dim + 1) * 4)

    # c. quality
    qual, models = {}, {}
    for tag, on in (("plain", False), ("secagg", True)):
        cfg = config(on, **{"data.source": "ml-100k", "fed.sample-rate": args.quality_q,
                            "fed.rounds": args.quality_rounds, "fed.eval-every": NEVER})
        run = run_sim(f"quality_{tag}", cfg, root, num_cpus=args.num_cpus, progress=False,
                      time_limit=max(args.time_limit, 400.0))
        final = run.final_eval
        qual[tag] = final.get("ndcg@10", math.nan)
        fig[f"quality_{tag}_ndcg10"] = qual[tag]
        fig[f"quality_{tag}_recall10"] = final.get("recall@10", math.nan)
        fig[f"quality_{tag}_median_round_seconds"] = run.figures.get("median_round_seconds", math.nan)
        models[tag] = load_arrays(run.path / "model.safetensors") if run.complete else None
    fig["quality_ndcg10_diff"] = qual["secagg"] - qual["plain"]
    if models["plain"] is not None and models["secagg"] is not None:  # same noise: quantization is the difference
        fig["quality_model_max_abs_diff"] = max(float(np.max(np.abs(models["plain"][k] - models["secagg"][k])))
                                                for k in models["plain"])
        fig["quality_model_max_abs_value"] = max(float(np.max(np.abs(a))) for a in models["plain"].values())
    fig["benchmark_seconds"] = time.perf_counter() - t_start

    goals = [target("secagg_overhead_100", fig.get("secagg_overhead_100"), "<=", TARGET_OVERHEAD_100),
             # "equal within noise": same seeded DP noise in both, so only quantization differs
             target("quality_abs_ndcg10_diff", abs(fig["quality_ndcg10_diff"]), "<=", TARGET_QUALITY_DIFF)]
    print()
    print(f"a. Round time, synthetic:{POPULATION}, DP on in both (same seeded noise, clip {base.dp.clip}), "
          f"{args.rounds} rounds, median of rounds 2..; num_cpus={args.num_cpus}")
    print(table(["cohort", "clients/rnd plain", "clients/rnd secagg", "plain s", "secagg s", "secagg/plain",
                 "rnd1 plain s", "rnd1 secagg s"], speed_rows))
    print()
    print(f"b. Bytes per client per round, {n_items} items x (dim {base.model.dim} + 1), SecAgg+ "
          f"{int(by['neighbours'])} neighbours, {base.secagg.quantization_bits}-bit quantization, modulus 2^32")
    kb = lambda v: v / 1024  # noqa: E731
    print(table(["message", "KiB", "how"], [
        ["plain update upload (float32)", kb(by["plain_upload_bytes"]), "measured: ndarray_to_bytes"],
        [f"SecAgg+ masked vector upload ({by['secagg_masked_dtype']})", kb(by["secagg_masked_upload_bytes"]),
         "measured: ndarray_to_bytes of quantize+mod"],
        ["SecAgg+ key setup upload (2 pub keys + enc. shares)", kb(by["secagg_setup_upload_bytes"]),
         f"estimated: measured sizes (keys {int(by['public_keys_bytes'])} B, ciphertext {int(by['ciphertext_bytes'])} B) x counts"],
        ["SecAgg+ unmask upload (seed shares)", kb(by["secagg_unmask_upload_bytes"]),
         f"estimated: share {int(by['share_bytes'])} B x neighbours"],
        ["SecAgg+ total upload", kb(by["secagg_total_upload_bytes"]), "estimated (sum)"],
        ["SecAgg+ protocol download (keys, ciphertexts)", kb(by["secagg_protocol_download_bytes"]), "estimated"],
        ["SecAgg+ upload / plain upload", by["secagg_total_upload_bytes"] / by["plain_upload_bytes"], "ratio"],
    ]))
    print()
    print(f"c. Quality, ML-100K, DP on in both (same seeded noise), q={args.quality_q:g}, {args.quality_rounds} rounds, final test")
    print(table(["run", "NDCG@10", "Recall@10", "median round s"], [
        ["plain", fig["quality_plain_ndcg10"], fig["quality_plain_recall10"], fig["quality_plain_median_round_seconds"]],
        ["SecAgg+", fig["quality_secagg_ndcg10"], fig["quality_secagg_recall10"],
         fig["quality_secagg_median_round_seconds"]],
        ["SecAgg+ - plain", fig["quality_ndcg10_diff"], "", ""]]))
    if "quality_model_max_abs_diff" in fig:
        print(f"final models differ by at most {fig['quality_model_max_abs_diff']:.3g} per value (largest value "
              f"{fig['quality_model_max_abs_value']:.3g}): SecAgg+'s quantization, the only difference")
    print()
    print(targets_table(goals))
    print(f"benchmark wall time {fig['benchmark_seconds']:.0f} s")
    if args.json:
        write_json(args.json, fig, goals)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
