"""``fedrec privacy plan``: the noise multiplier a privacy budget allows (central, local, silos, distributed)."""

from __future__ import annotations

import argparse
import math

from common.choices import Accountant, values
from common.cli import UsageError
from server.cli._args import positive_float, positive_int, probability, sample_rate


def add_privacy_commands(commands: argparse._SubParsersAction) -> None:
    privacy = commands.add_parser("privacy", help="plan a differentially private run",
                                  description="Privacy planning before a run starts.")
    privacy_cmds = privacy.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    plan = privacy_cmds.add_parser(
        "plan", help="the noise multiplier that meets a target epsilon",
        description="Find the smallest noise multiplier sigma (on a 0.001 grid) whose epsilon, under the chosen "
                    "accountant, is at most the target, then show what that sigma costs under both RDP and PLD. "
                    "Give the sampling rate directly or as expected clients per round out of a population.")
    plan.add_argument("--target-epsilon", type=positive_float, required=True, metavar="E",
                      help="privacy budget epsilon of the whole run")
    plan.add_argument("--delta", type=probability, required=True, metavar="D", help="delta of the guarantee")
    plan.add_argument("--rounds", type=positive_int, required=True, metavar="R", help="rounds of the run")
    rate = plan.add_mutually_exclusive_group()
    rate.add_argument("--sample-rate", type=sample_rate, metavar="q", help="Poisson sampling rate per round")
    rate.add_argument("--clients-per-round", type=positive_int, metavar="K",
                      help="expected clients per round (needs --population)")
    plan.add_argument("--population", type=positive_int, metavar="N",
                      help="number of clients (with --clients-per-round)")
    plan.add_argument("--steps-per-round", type=positive_int, default=1, metavar="S",
                      help="noisy steps per round (local DP-SGD steps; 1 for DP-FedAvg, default)")
    plan.add_argument("--accountant", choices=values(Accountant), default=Accountant.RDP.value,
                      help="accountant the plan must satisfy (default rdp, the conservative one)")
    plan.add_argument("--local", action="store_true",
                      help="local DP (dp.mode=local): the sigma each device adds to its own update; sampling "
                           "gives no amplification, so no rate is needed")
    plan.add_argument("--silo", action="store_true",
                      help="silos (fed.partition=silo): one user inside a sampled silo moves the silo's update by "
                           "up to 2C, so the relation is replace-one (user-level ε for silos)")
    ddp = plan.add_argument_group(
        "distributed DP (--distributed)",
        "dp.mode=distributed: each device adds discrete Gaussian noise inside the SecAgg+ field (Kairouz, Liu, "
        "Steinke 2021); the plan gives each device's noise, the grid step and both epsilons. See "
        "docs/DISTRIBUTED_DP.md.")
    ddp.add_argument("--distributed", action="store_true", help="plan distributed DP instead of central DP")
    ddp.add_argument("--bits", type=positive_int, nargs="+", default=[16], metavar="B",
                     help="SecAgg+ field bits per value, one plan each (default 16)")
    ddp.add_argument("--min-survivors", type=positive_int, metavar="N",
                     help="fewest devices a released round may sum (the noise is sized for them; rounds below "
                          "are abandoned)")
    ddp.add_argument("--max-cohort", type=positive_int, metavar="N",
                     help="most devices a round may sum (default: the 1-1e-9 quantile of the Poisson cohort, "
                          "from --population)")
    ddp.add_argument("--clip", type=positive_float, default=1.0, metavar="C", help="L2 clip of an update (default 1)")
    ddp.add_argument("--dim", type=positive_int, default=109_330, metavar="D",
                     help="values per update (default 109,330: ML-100K's item embeddings and biases at "
                          "model.dim=64)")
    ddp.add_argument("--wrap-probability", type=probability, default=1e-9, metavar="P",
                     help="bound on the probability that one round's noisy sum wraps the field (default 1e-9)")
    ddp.add_argument("--against", choices=("released", "server"), default="released",
                     help="which epsilon the target binds: the released models' (amplified by secret sampling, "
                          "default) or the server's (no amplification)")
    plan.set_defaults(handler=cmd_privacy_plan)


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    from common.privacy.ledger import Accountant
    from common.privacy.plan import format_plan, plan_noise_multiplier, sample_rate_from

    accountant = Accountant(args.accountant)
    if args.distributed:
        return _plan_distributed(args, accountant)
    if args.local:
        return _plan_local(args, accountant)
    if args.clients_per_round is not None:
        if args.population is None:
            raise UsageError("--clients-per-round needs --population (the number of clients)")
        try:
            q = sample_rate_from(args.clients_per_round, args.population)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif args.sample_rate is None:
        raise UsageError("give --sample-rate q or --clients-per-round K with --population N (or --local)")
    else:
        if args.population is not None:
            raise UsageError("--population goes with --clients-per-round, not with --sample-rate")
        q = args.sample_rate
    from common.privacy.ledger import Relation

    relation = Relation.REPLACE_ONE if args.silo else Relation.ADD_OR_REMOVE_ONE
    common = {"delta": args.delta, "rounds": args.rounds, "sample_rate": q, "steps_per_round": args.steps_per_round,
              "relation": relation}
    try:
        sigma = plan_noise_multiplier(target_epsilon=args.target_epsilon, accountant=accountant, **common)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    unit = ("one user inside a silo, replace-one" if args.silo else
            "one user, add/remove (zero-out, population size public)")
    print(f"noise multiplier sigma = {sigma:.3f}  (smallest on a 0.001 grid with "
          f"{accountant.value.upper()} epsilon <= {args.target_epsilon:g} at delta = {args.delta:g}, q = {q:.4g}; "
          f"{unit}; amplification assumes secret cohorts)")
    print(format_plan(noise_multipliers=[sigma], target_epsilon=args.target_epsilon, **common))
    return 0


def _plan_local(args: argparse.Namespace, accountant) -> int:
    from common.privacy.ledger import Relation
    from common.privacy.plan import format_plan, plan_local_noise_multiplier

    if args.steps_per_round != 1:
        raise UsageError("--steps-per-round does not apply to local DP (one noisy update per round)")
    try:
        sigma = plan_local_noise_multiplier(target_epsilon=args.target_epsilon, delta=args.delta,
                                            rounds=args.rounds, accountant=accountant)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"local DP: each device adds N(0, (sigma*C)^2) with sigma = {sigma:.3f} to its clipped update "
          f"({accountant.value.upper()} epsilon <= {args.target_epsilon:g} at delta = {args.delta:g} over "
          f"{args.rounds} rounds, every round charged, no amplification by sampling)")
    print("accounting per round: one Gaussian release under replace-one (two updates of a device differ by up to "
          "2C), q = 1:")
    print(format_plan(noise_multipliers=[sigma], target_epsilon=args.target_epsilon, delta=args.delta,
                      rounds=args.rounds, sample_rate=1.0, relation=Relation.REPLACE_ONE))
    return 0


def _plan_distributed(args: argparse.Namespace, accountant) -> int:
    from common.privacy.distributed_plan import cohort_bound, format_distributed_plans, plan_distributed
    from common.privacy.ledger import Accountant
    from common.privacy.plan import plan_noise_multiplier, sample_rate_from

    if args.local or args.silo:
        raise UsageError("--distributed plans one user per device (add/remove); it does not combine with "
                         "--local or --silo")
    if accountant is not Accountant.RDP:
        raise UsageError("--distributed is accounted by RDP only (no privacy-loss distribution exists for a sum "
                         "of discrete Gaussians): use --accountant rdp")
    if args.steps_per_round != 1:
        raise UsageError("--steps-per-round does not apply to --distributed (one noisy sum per round)")
    if args.min_survivors is None:
        raise UsageError("--distributed needs --min-survivors N (the SecAgg+ threshold or a minimum cohort)")
    try:
        if args.clients_per_round is not None:
            if args.population is None:
                raise UsageError("--clients-per-round needs --population (the number of clients)")
            q = sample_rate_from(args.clients_per_round, args.population)
        elif args.sample_rate is not None:
            q = args.sample_rate
        else:
            raise UsageError("give --sample-rate q or --clients-per-round K with --population N")
        if args.max_cohort is not None:
            max_cohort = args.max_cohort
        elif args.population is not None:
            max_cohort = cohort_bound(args.population, q, args.wrap_probability)
        else:
            raise UsageError("--distributed needs --max-cohort N or --population N (the field is sized for the "
                             "largest cohort)")
        max_cohort = max(max_cohort, args.min_survivors)
        common = {"target_epsilon": args.target_epsilon, "delta": args.delta, "rounds": args.rounds,
                  "sample_rate": q, "min_survivors": args.min_survivors, "max_cohort": max_cohort,
                  "clip": args.clip, "dim": args.dim, "wrap_probability": args.wrap_probability,
                  "amplification": args.against == "released"}
        central = plan_noise_multiplier(target_epsilon=args.target_epsilon, delta=args.delta, rounds=args.rounds,
                                        sample_rate=q if args.against == "released" else 1.0)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    plans, refused = [], []
    for bits in args.bits:
        try:
            plans.append(plan_distributed(modulus_bits=bits, **common))
        except ValueError as exc:
            refused.append(f"{bits} bits: {exc}")
    expected = round(q * args.population) if args.population is not None else None
    target = "released models (amplified, secret cohorts)" if args.against == "released" else "the server"
    print(f"distributed DP: each device adds discrete Gaussian noise N_Z(0, sigma2_grid) in grid units of gamma "
          f"(device_std = gamma*sqrt(sigma2_grid) per value) to its update clipped to C = {args.clip:g} "
          f"({args.dim} values), sized so that {args.min_survivors} surviving devices carry the noise; "
          f"RDP epsilon <= {args.target_epsilon:g} for {target} at delta = {args.delta:g}, q = {q:.4g}, "
          f"{args.rounds} rounds; the field holds {max_cohort} devices with P(wrap) <= {args.wrap_probability:g} "
          f"per round")
    if plans:
        print(format_distributed_plans(plans, expected_cohort=expected))
    for line in refused:
        print(f"refused: {line}")
    print(f"central DP at the same target: sigma = {central:.3f}. z@n_min is what {args.min_survivors} devices' "
          f"noise amounts to; a round with K survivors carries sqrt(K/{args.min_survivors}) times more noise "
          f"than that" + (f" (x{math.sqrt(expected / args.min_survivors):.2f} at the expected {expected})"
                          if expected and expected >= args.min_survivors else "") + ".")
    print("eps_server: what the server (which knows the cohort) can learn, no amplification, n_min noise shares"
          + (f"; eps_server@{expected}: the same if all {expected} expected devices survive." if expected else "."))
    if not plans:
        raise UsageError("no bit width could hold the noisy sum (see the lines above)")
    return 0

