"""``fedrec-client``: the device side of fedrec on the command line.

::

    fedrec-client import ratings.csv [--items items.csv] [--encoding latin-1]   your ratings (and the server's item list)
    fedrec-client recommend [--k 10] [--model model.safetensors --items items.csv] [--timing]
    fedrec-client ask "TEXT" [--k 5] [--alpha A] [--timing] items for a request in words (on the device)
    fedrec-client chat [--k 5] [--alpha A] [--new]         a conversation: request, critique, take (kept)
    fedrec-client status                                   what is stored on this device
    fedrec-client privacy set [--clip C] [--local-noise S] this device's privacy floor (the server cannot lower it)
    fedrec-client forget [--yes]                           delete all of it
    fedrec-client join --superlink HOST:PORT --root-certificates ca.pem [--auth-key KEY]
                  [--trusted-entities trusted-entities.yaml] [--port 9094]

Everything lives in one SQLite file, ``--db`` (default ``~/.fedrec/device.sqlite``); see
:mod:`client.store`. ``recommend`` runs on the device: the user vector is reconstructed from
the stored ratings and never leaves it. Mistakes in what the user typed or gave end with one
line ``fedrec-client: error: ...`` and exit status 2, also for a damaged store or model file
(never a traceback, never a silent "Top 0" from a model with NaN values).

Imports stay light (no torch) until a user vector has to be fitted: a cached vector makes
``recommend`` a NumPy-only computation.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shlex
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from client.ratings_file import read_ratings_file
from client.recommend import load_model_files, rank_items, user_vector
from client.store import DEFAULT_DB, DeviceStore, StoreError
from common.cli import UsageError, report_error
from common.data.errors import DataError
from common.data.items_file import read_items_with_texts
from common.interactive import DEFAULT_ALPHA
from common.keys import NODE_DATA_PATH

PROG = "fedrec-client"
RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API (the ClientApp talks to it) stays on this device


def _db(args: argparse.Namespace) -> Path:
    return Path(args.db).expanduser().absolute()


# ---------------------------------------------------------------- import

def _embed_texts(texts: list[str]) -> None:
    """The catalogue's MiniLM sentence embeddings, computed once now (cached on this device under
    $FEDREC_CACHE): a hybrid round then never loads the transformer, and its memory stays that of
    a training step. A one-off, here rather than inside a round."""
    from common.config import ModelConfig
    from common.models.hybrid.text import base_embeddings

    t0 = time.perf_counter()
    print(f"embedding {len(texts)} item texts with MiniLM (once, for the hybrid model)...", flush=True)
    try:
        base_embeddings(texts, ModelConfig().text_max_length)
    except ImportError as exc:  # an install without the language model: the texts are kept all the same
        print(f"  not embedded: {exc}")
        return
    print(f"  done in {time.perf_counter() - t0:.1f} s (cached)")


def _import_published_embeddings(items_path: str, texts: list[str]) -> bool:
    """The catalogue's sentence embeddings published beside the items file, when there: checked
    against these texts and cached, so this device never runs MiniLM over the catalogue. A file
    that does not match is refused by name (UsageError); none: False."""
    try:
        from common.config import ModelConfig
        from common.models.hybrid.text import embeddings_file_for, import_embeddings
    except ImportError:  # an install without the language model: the texts are kept all the same
        return False
    path = embeddings_file_for(items_path)
    if not path.is_file():
        return False
    try:
        import_embeddings(path, texts, ModelConfig().text_max_length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"{path}: the server's sentence embeddings of the {len(texts)} items imported (no MiniLM pass here)")
    return True


def cmd_import(args: argparse.Namespace) -> int:
    if args.ratings is None and args.items is None:
        raise UsageError("nothing to import: give a ratings file, --items items.csv, or both")
    encoding = _encoding(args.encoding)
    # validate both files before storing either
    ids, titles, texts = read_items_with_texts(args.items, encoding) if args.items else (None, None, None)
    items = (ids, titles) if args.items else None
    if args.ratings is not None:
        read_ratings_file(args.ratings, encoding)
    # published embeddings are checked before anything is stored (a mismatch stores nothing)
    published = texts is not None and _import_published_embeddings(args.items, list(texts))
    with DeviceStore(_db(args)) as store:
        if items is not None:
            dropped = store.set_catalog(*items)
            if texts is not None:
                store.set_item_texts(items[0], texts)
                if args.embed and not published:
                    _embed_texts(texts)
            print(f"{args.items}: item catalogue of {len(items[0])} items stored"
                  + (" with their texts (the hybrid model can run here)" if texts is not None else "")
                  + ("; the stored global model indexed another item list and was dropped" if dropped else ""))
        if args.ratings is not None:
            report = store.import_ratings(args.ratings, encoding)
            print(report.summary())
            catalog = store.catalog()[0]
            if catalog:
                unknown = store.map_ratings({item: i for i, item in enumerate(catalog)}).unknown
                if unknown:
                    print(f"note: {len(unknown)} rated items are not in the item catalogue and will not be used: "
                          f"{_some(unknown)}")
        counts = store.counts()
    print(f"{_db(args)}: {counts['ratings']} ratings, {counts['catalog']} catalogue items")
    return 0


def _encoding(name: str | None) -> str | None:
    """``--encoding``, checked before any file is read (the readers log the warning per file)."""
    if name is not None:
        try:
            codecs.lookup(name)
        except LookupError:
            raise UsageError(f"--encoding {name!r}: unknown text encoding (e.g. utf-8, latin-1, cp1252)") from None
    return name


def _some(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


# ---------------------------------------------------------------- recommend

def cmd_recommend(args: argparse.Namespace) -> int:
    if (args.model is None) != (args.items is None):
        raise UsageError("--model and --items go together: a model file and the item list its rows stand for")
    t0 = time.perf_counter()
    with DeviceStore(_db(args), create=False) as store:
        model = load_model_files(args.model, args.items) if args.model else store.get_global_model()
        if model is None:
            raise UsageError("no global model on this device yet: join a federation (fedrec-client join ...) "
                             "or give --model model.safetensors --items items.csv")
        index = model.index()
        rated = store.map_ratings(index)
        if len(rated.items) == 0:
            n = len(rated.unknown)
            raise UsageError("no ratings on this device: import yours first (fedrec-client import ratings.csv)" if not n
                             else f"none of your {n} rated items is in the model's item list: nothing to start from")
        dismissed = [index[item] for item, kind, _ in store.feedback() if kind == "dismiss" and item in index]
        t_load = time.perf_counter()
        vector, imported = user_vector(store, model, rated)
        cached, t_import = imported is None, imported or 0.0
        t_user = time.perf_counter()
        try:
            recs = rank_items(model, vector, rated, args.k, exclude=dismissed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        t_rank = time.perf_counter()
    source = f"global model of round {model.round}" if model.round is not None else Path(args.model).name
    print(f"Top {len(recs)} of {len(model.item_ids)} items for you ({source}; from {len(rated.items)} of your ratings)")
    if rated.unknown:
        print(f"note: {len(rated.unknown)} rated items are not in the model's item list and were not used: "
              f"{_some(rated.unknown)}")
    width = len(str(len(recs)))
    for rank, rec in enumerate(recs, start=1):
        print(f"{rank:>{width}}. {model.titles[rec.item]}  (score {rec.score:.3f})")
        print(f"{'':>{width}}  because you liked {model.titles[rec.because]} (similarity {rec.similarity:.2f})")
    if args.timing:
        ms = lambda a, b: f"{1000 * (b - a):.1f} ms"  # noqa: E731
        fitted = f"fitted, after {ms(0, t_import)} importing torch" if not cached else "cached"
        print(f"timing: {ms(t0, t_rank - t_import)} (load {ms(t0, t_load)}, user vector "
              f"{ms(t_load, t_user - t_import)} {fitted}, rank {ms(t_user, t_rank)})")
    return 0


# ---------------------------------------------------------------- ask, chat

def cmd_ask(args: argparse.Namespace) -> int:
    from client.chat import ask

    if (args.model is None) != (args.items is None):
        raise UsageError("--model and --items go together: a model file and the item list its rows stand for")
    with DeviceStore(_db(args), create=False) as store:
        return ask(store, args.request, alpha=args.alpha, k=args.k, timing=args.timing, model_path=args.model,
                   items_path=args.items)


def cmd_chat(args: argparse.Namespace) -> int:
    from client.chat import chat

    with DeviceStore(_db(args), create=False) as store:
        return chat(store, alpha=args.alpha, k=args.k, new=args.new)


# ---------------------------------------------------------------- status

def cmd_status(args: argparse.Namespace) -> int:
    with DeviceStore(_db(args), create=False) as store:
        counts, model, ledger = store.counts(), store.get_global_model(), store.ledger_state()
        unknown = store.map_ratings(model.index() if model else dict.fromkeys(store.catalog()[0], 0)).unknown
        has_vector = store.get_user_vector() is not None
        policy = store.privacy_policy()
        print(f"device store: {store.path} (schema {store.schema_version()}, {_size(store.path)})")
        print(f"client id (pseudonymous, sent to the server): {store.client_id()}")
    known = f" ({len(unknown)} not in the catalogue)" if counts["catalog"] and unknown else ""
    print(f"ratings: {counts['ratings']}{known}")
    print(f"feedback events: {counts['feedback']}")
    print(f"item catalogue: {counts['catalog']} items" if counts["catalog"] else "item catalogue: none")
    if model is None:
        print("global model: none")
    else:
        print(f"global model: {len(model.item_ids)} items x {model.embeddings.shape[1]}, round {model.round}"
              f", loss {model.loss or 'default'}")
    print(f"user vector: {'stored' if has_vector else 'none'} (never sent)")
    print(_policy_line(policy))
    if ledger is None:
        print("privacy: no local release recorded (user-level DP noise, if any, is added by the server)")
    else:
        from common.privacy.ledger import PrivacyLedger  # its accountant libraries only when needed

        try:
            spent = PrivacyLedger.from_state_dict(ledger)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{_db(args)}: the stored privacy ledger is damaged ({type(exc).__name__}: {exc})") from None
        print(f"privacy: epsilon {spent.epsilon():.3g} at delta {spent.delta:g} over {len(spent.events)} releases")
    return 0


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    return f"{total / 1024:.0f} KiB"


# ---------------------------------------------------------------- privacy floor

def cmd_privacy(args: argparse.Namespace) -> int:
    """Show or set the device's privacy floor (common/privacy/device.py): the clip bound of
    everything it sends and, for local DP, the least noise it adds itself."""
    from common.privacy.device import DevicePolicy

    with DeviceStore(_db(args), create=args.privacy_command == "set") as store:
        policy = store.privacy_policy()
        if args.privacy_command == "set":
            if args.clip is None and args.local_noise is None:
                raise UsageError("privacy set: give --clip C and/or --local-noise SIGMA")
            try:
                policy = DevicePolicy(clip=policy.clip if args.clip is None else args.clip,
                                      local_noise=policy.local_noise if args.local_noise is None else args.local_noise)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            store.set_privacy_policy(policy)
    print(_policy_line(policy))
    return 0


def _policy_line(policy) -> str:
    noise = (f"adds its own noise N(0, (sigma*C)^2) with sigma >= {policy.local_noise:g} (local DP; an instruction "
             "asking for less is refused)" if policy.local_noise > 0 else
             "adds no noise of its own (the server adds it: central DP)")
    return f"privacy floor: every update clipped to L2 <= {policy.clip:g} (the server may only tighten it); {noise}"


# ---------------------------------------------------------------- forget

def cmd_forget(args: argparse.Namespace) -> int:
    path = _db(args)
    if not path.exists():
        print(f"nothing to forget: no device store at {path}")
        return 0
    if not args.yes:
        try:
            answer = input(f"Delete every rating, model and key fedrec keeps in {path}? This cannot be undone. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    with DeviceStore(path, create=False) as store:
        removed = store.forget()
    print(f"deleted {', '.join(str(p) for p in removed)}")
    return 0


# ---------------------------------------------------------------- join

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def supernode_command(*, superlink: str, root_certificates: str | Path, db: str | Path, port: int = 9094,
                      auth_key: str | Path | None = None, trusted_entities: str | Path | None = None) -> list[str]:
    """The ``flower-supernode`` (Flower 1.42) command that connects the device store ``db``.

    ``--node-config data-path='<db>'`` tells the ClientApp where the device store is. The
    Runtime API listens on 127.0.0.1:``port`` (each SuperNode on a host needs its own). With
    ``trusted_entities`` (a YAML file of Ed25519 public keys) the SuperNode runs only app
    bundles signed by one of them. 1.42 installs no app dependencies at run time unless
    ``--allow-runtime-dependency-installation`` is given (it is not): the installed
    ``fedrec[client]`` is what runs. Mistakes raise :class:`UsageError`.
    """
    match = _ADDRESS.match(superlink)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise UsageError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. fedrec.example.org:9093")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: expected a port number 1-65535")
    db = Path(db).expanduser().absolute()
    if "'" in str(db):
        raise UsageError(f"--db {db}: a path with a single quote cannot be passed in --node-config")
    files = [("--root-certificates", root_certificates), ("--auth-key", auth_key),
             ("--trusted-entities", trusted_entities)]
    for flag, name in files:
        if name is not None and not Path(name).expanduser().is_file():
            raise UsageError(f"{flag} {name}: no such file")
    ca = str(Path(root_certificates).expanduser().absolute())
    command = [_supernode_executable(), "--superlink", superlink, "--root-certificates", ca,
               "--node-config", f"{NODE_DATA_PATH}='{db}'", "--host", RUNTIME_HOST, "--port", str(port)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(Path(auth_key).expanduser().absolute())]
    if trusted_entities is not None:
        command += ["--trusted-entities", str(Path(trusted_entities).expanduser().absolute())]
    return command


def _shell_quote(word: str) -> str:
    """shlex.quote, but data-path='...' reads as "data-path='...'" rather than '"'"' soup."""
    if "'" in word and not re.search(r'["$`\\!]', word):
        return f'"{word}"'
    return shlex.quote(word)


def _supernode_executable() -> str:
    beside = Path(sys.executable).parent / "flower-supernode"  # this environment's, even when not on PATH
    return str(beside) if beside.is_file() else shutil.which("flower-supernode") or "flower-supernode"


def cmd_join(args: argparse.Namespace) -> int:
    command = supernode_command(superlink=args.superlink, root_certificates=args.root_certificates, db=_db(args),
                                port=args.port, auth_key=args.auth_key, trusted_entities=args.trusted_entities)
    if args.trusted_entities is None:
        print("fedrec-client: warning: without --trusted-entities this device runs whatever app the SuperLink "
              "sends; ask the operator for trusted-entities.yaml", file=sys.stderr)
    with DeviceStore(_db(args), create=False) as store:
        ids = store.catalog()[0]
        if not ids:
            raise UsageError("no item catalogue on this device: import the server's items file first "
                             "(fedrec-client import --items items.csv)")
        if len(store.map_ratings({item: i for i, item in enumerate(ids)}).items) == 0:
            raise UsageError("none of your ratings is of a catalogue item: nothing to train on (fedrec-client import)")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    if args.dry_run:
        print("FLWR_TELEMETRY_ENABLED=0 " + " ".join(_shell_quote(word) for word in command))
        return 0
    if not Path(command[0]).is_file():
        raise UsageError("flower-supernode not found: install fedrec[client] (it brings flwr)")
    if os.name == "posix":
        os.execve(command[0], command, env)  # the SuperNode replaces this process: signals reach it directly
    import subprocess

    return subprocess.call(command, env=env)


# ---------------------------------------------------------------- parser

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help=f"the device store, an SQLite file (default {DEFAULT_DB})")
    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="Your ratings, your recommendations, on this device.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = commands.add_parser("import", parents=[common], help="store your ratings (and the server's item list)",
                              description="Ratings: CSV with header item,rating[,timestamp] or "
                                          "user,item,rating,timestamp (one user). Items: item_id,title[,text]; "
                                          "a text column is kept for the hybrid model (--embed also embeds the "
                                          "texts now, once, instead of in the first hybrid round).")
    imp.add_argument("ratings", nargs="?", help="your ratings file (.csv, or .tsv tab-separated)")
    imp.add_argument("--items", help="the server's items file item_id,title (the model's item list)")
    imp.add_argument("--encoding", help="the files' text encoding when not UTF-8, e.g. latin-1 (a warning is printed)")
    imp.add_argument("--embed", action="store_true",
                     help="embed the item texts with MiniLM now (once, ~15 s for 1,682 items), so that a hybrid "
                          "round never loads the transformer; without it the first hybrid round does")
    imp.set_defaults(run=cmd_import)

    rec = commands.add_parser("recommend", parents=[common], help="top-K items for you, computed here")
    rec.add_argument("--k", type=_positive_int, default=10, help="how many items (default 10)")
    rec.add_argument("--model", help="a run's model.safetensors instead of the stored global model")
    rec.add_argument("--items", help="the items file of --model (item_id,title, one row per model row)")
    rec.add_argument("--timing", action="store_true", help="print how long it took")
    rec.set_defaults(run=cmd_recommend)

    alpha_help = (f"α of r = α·taste + (1−α)·request (default {DEFAULT_ALPHA}; 0: the request alone, 1: your taste "
                  "alone)")
    ask = commands.add_parser("ask", parents=[common], help="items for a request in words, answered here",
                              description="Ranks the catalogue for a request in words (English) blended with your "
                                          "taste (your ratings against the global model). Nothing leaves the device.")
    ask.add_argument("request", help='what you would like, e.g. "something like Toy Story but for adults"')
    ask.add_argument("--k", type=_positive_int, default=5, help="how many items (default 5)")
    ask.add_argument("--alpha", type=_unit_float, default=DEFAULT_ALPHA, help=alpha_help)
    ask.add_argument("--model", help="a run's model.safetensors instead of the stored global model")
    ask.add_argument("--items", help="the items file of --model")
    ask.add_argument("--timing", action="store_true", help="print how long it took (the encoder's load apart)")
    ask.set_defaults(run=cmd_ask)

    chat = commands.add_parser("chat", parents=[common], help="a conversation: request, critique, take",
                               description="A conversation in the terminal: a request, then critiques (more/less "
                                           "like, not, newer/older, a new request) and items you take (they count as "
                                           "liked on this device). Kept on the device across restarts.")
    chat.add_argument("--k", type=_positive_int, default=5, help="items per turn (default 5)")
    chat.add_argument("--alpha", type=_unit_float, default=DEFAULT_ALPHA, help=alpha_help)
    chat.add_argument("--new", action="store_true", help="start a new conversation (forget the saved one)")
    chat.set_defaults(run=cmd_chat)

    status = commands.add_parser("status", parents=[common], help="what is stored on this device")
    status.set_defaults(run=cmd_status)

    privacy = commands.add_parser("privacy", parents=[common], help="this device's privacy floor",
                                  description="The device's own privacy floor: the L2 clip of everything it sends "
                                              "and, for local DP, the least noise it adds itself. The server's "
                                              "instructions may tighten it, never loosen it.")
    privacy_cmds = privacy.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    privacy_cmds.add_parser("show", parents=[common], help="print the floor").set_defaults(run=cmd_privacy)
    privacy_set = privacy_cmds.add_parser("set", parents=[common], help="set the floor")
    privacy_set.add_argument("--clip", type=_positive_float, help="L2 bound of any update this device sends")
    privacy_set.add_argument("--local-noise", type=_nonnegative_float, metavar="SIGMA",
                             help="least local-DP noise multiplier this device adds itself (0: none, central DP)")
    privacy_set.set_defaults(run=cmd_privacy)

    forget = commands.add_parser("forget", parents=[common], help="delete everything stored on this device")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.set_defaults(run=cmd_forget)

    join = commands.add_parser("join", parents=[common], help="take part in federated training (flower-supernode)")
    join.add_argument("--superlink", required=True, help="the server's Fleet API address HOST:PORT")
    join.add_argument("--root-certificates", required=True, help="PEM CA certificate that signed the server's")
    join.add_argument("--auth-key", help="this device's SuperNode private key (node authentication)")
    join.add_argument("--port", type=int, default=9094, help="local Runtime API port (default 9094)")
    join.add_argument("--trusted-entities", metavar="YAML",
                      help="the operator's trusted-entities.yaml: run only app bundles signed by these keys")
    join.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    join.set_defaults(run=cmd_join)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and argparse's own usage errors (2)
        return int(exc.code or 0)
    if "db" not in args:  # --db may come before or after the command: neither parser sets a default
        args.db = DEFAULT_DB
    try:
        return int(args.run(args))
    except (UsageError, DataError, StoreError, sqlite3.Error, OSError) as exc:
        if isinstance(exc, sqlite3.Error):  # e.g. "database is locked": say which database
            exc = UsageError(f"{_db(args)}: {exc}")
        return report_error(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())
