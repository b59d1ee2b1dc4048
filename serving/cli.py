"""The serving command lines, read before TensorFlow loads (`model.cli` explains why)."""
from __future__ import annotations

import argparse
import os
import re
from typing import Sequence

from pipeline import argtypes, storage

EXPORT_DESCRIPTION = ("Exports a trained model as a TF Serving SavedModel version "
                      "(README § 3. Serving).")
SERVER_DESCRIPTION = ("A TF Serving–compatible gRPC server for local use and tests "
                      "(README § 3. Serving).")
# serving.server's bounds on one item-id input of a request: its width and its item slots
# (rows x width). A session wider than the first is refused (update_state needs every item
# of a session: the client does not cut it); the second bounds a request of many rows.
MAX_SEQUENCE_WIDTH = 100_000
MAX_SEQUENCE_ITEMS = 1_000_000
# The most rows (users) one request may send: `next_items` scores every row over the whole
# catalogue, so a few bytes naming 60,000 rows (a short *_val list is filled) held 6 GB.
MAX_REQUEST_ROWS = 1024


# The longest --timeout: a day. gRPC's deadline is a time point in int64 nanoseconds or
# seconds: a larger one (--timeout 1e30) overflowed into a deadline already past, and every
# call failed at once with DEADLINE_EXCEEDED; a call that takes a day has hung.
MAX_TIMEOUT_S = 86_400.0
TIMEOUT = argtypes.number(float, 0.0, strict=True, high=MAX_TIMEOUT_S)


def model_name(text: str) -> str:
    """An argparse `type` for a served model's name (model_spec.name): neither empty nor
    holding spaces (`--model-name ''` served a model no client can name: the client refuses
    an empty one, and the demo waited two minutes for a server line it could not read)."""
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be a non-empty name without spaces, got {text!r}")
    return text


model_name.__name__ = "model name"


def state_db(text: str) -> str:
    """An argparse `type` for the state store's file: a local path, not empty (SQLite opens
    '' as a temporary database, deleted on close: a backfill into it was lost) and not a
    folder."""
    path = argtypes.local_path(argtypes.non_empty(text))
    if path.startswith("file:"):  # (SQLite reads it as a URI: the file made was 0644, and
        # forget and prune, which look for the path, did not find it)
        raise argparse.ArgumentTypeError(f"{path} is an SQLite URI: pass the file's path")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder: pass the path of a SQLite file")
    return path


state_db.__name__ = "state database path"
# serving.server's bounds on its counts and times: past them a value was a traceback in a
# thread (--poll-seconds 1e30: "timestamp out of range", the poller gone for good) or a
# poll loop that spun (--poll-seconds 1e-300: 72% of a core while idle)
SERVER_COUNT = argtypes.positive_size
GRPC_THREADS = argtypes.at_most(10_000, argtypes.positive_int)
POLL_SECONDS = argtypes.number(float, 0.01, high=86_400.0)
BATCH_TIMEOUT_MICROS = argtypes.at_most(3_600_000_000, argtypes.non_negative_int)
LOAD_RETRIES = argtypes.at_most(1_000_000, argtypes.non_negative_int)
LOAD_RETRY_INTERVAL_MICROS = argtypes.at_most(86_400_000_000, argtypes.non_negative_int)
# the batching options' defaults: given without --enable-batching, they are refused
BATCHING_DEFAULTS = {"max_batch_size": 64, "batch_timeout_micros": 0, "num_batch_threads": 1}


def add_connection_args(parser: argparse.ArgumentParser, timeout: float) -> None:
    """The options of a gRPC client command (`serving.client`, `serving.backfill`): the
    server, the time per call, a fixed session width and TLS (`connection_error`)."""
    parser.add_argument("--target", default="127.0.0.1:8500", help="HOST:PORT of the server")
    parser.add_argument("--timeout", type=TIMEOUT, default=timeout, help="seconds per call")
    parser.add_argument("--session-width", type=argtypes.positive_int, default=None,
                        help="fixed session_items width (for TF Serving with --enable_batching)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="root certificates to check the server with (default: the system's)")
    parser.add_argument("--tls-server-name", metavar="NAME",
                        help="the name in the server's certificate, when not the target's host")


def connection_error(args: argparse.Namespace, server: bool = True) -> str | None:
    """What is wrong with `add_connection_args`' options, or None (`server`: the command
    calls the server, so --target is checked too)."""
    if (args.tls_ca or args.tls_server_name) and not args.tls:
        return "--tls-ca and --tls-server-name need --tls"
    return target_error(args.target) if server else None


def target_error(target: str) -> str | None:
    """What is wrong with a --target that gRPC would not read as meant, or None: empty
    (gRPC logs lines of its own), a URL (it fails to resolve), a port outside 1-65535 (gRPC
    reads it modulo 65536: 74036 reaches a server on 8500)."""
    if not target.strip():
        return "--target must be HOST:PORT of the server, got ''"
    scheme = target.split("://", 1)[0].lower() if "://" in target else None
    if scheme in ("http", "https", "grpc", "grpcs"):
        return (f"--target {target} is a URL: pass HOST:PORT of the gRPC port "
                "(e.g. localhost:8500; --tls for TLS)")
    if target.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return None  # (socket paths; address lists, whose ports gRPC checks itself)
    host, colon, port = target.rsplit("/", 1)[-1].rpartition(":")  # (dns:///HOST:PORT)
    if not colon or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        return None  # no port, or a bare IPv6 address (gRPC's default port)
    if re.fullmatch(r"-?\d+", port) and not 1 <= int(port) <= 65535:
        return f"--target {target}: the port must be from 1 to 65535"
    return None


def export_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`python -m serving.export`'s options; exits with a usage error (status 2) or the help."""
    parser = argtypes.Parser(prog="python -m serving.export", description=EXPORT_DESCRIPTION,
                             project_version=False)  # (--version: the model version's)
    parser.add_argument("--model-dir", required=True, type=argtypes.tensorflow_folder,
                        help="training run folder (model.train --model-dir)")
    parser.add_argument("--export-base", required=True, type=argtypes.tensorflow_folder,
                        help="folder of versions, TF Serving's model_base_path")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: next integer)")
    parser.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                        help="the run's checkpoint with the best valid Recall@20 (default; the "
                             "latest for a run that never evaluated) or its latest")
    parser.add_argument("--keep-repeats", action="store_true",
                        help="read sessions' immediate repeats as events (a model trained on "
                             "records that keep them, not the pipeline's, which collapses "
                             "them; a HierTCN trained with --keep-current does so already)")
    return parser.parse_args(argv)


def export_error(args: argparse.Namespace) -> str | None:
    """Why `--model-dir` cannot be exported to `--export-base`, when that is plain without
    TensorFlow: a run folder that is not one, an export base that is a file or lies in the
    run folder (whose versions `serving.server` would then refuse to serve from it)."""
    if not os.path.isdir(args.model_dir):
        return f"--model-dir {args.model_dir} is not a folder: pass a model.train --model-dir"
    base = args.export_base
    if os.path.exists(base) and not os.path.isdir(base):
        return (f"--export-base {base} is a file, not a folder: pass the folder TF Serving "
                "watches (--model_base_path), created if missing")
    if storage.within(base, args.model_dir):
        return (f"--export-base {base} is inside the run folder {args.model_dir}: pass a "
                "folder of its own (TF Serving's --model_base_path)")
    kind = storage.folder_kind(base)
    if kind is not None and kind != "an export base (SavedModel versions)":
        what = ("; its parent may be the export base" if kind.startswith("a SavedModel")
                else "")
        return (f"--export-base {base} is {kind}{what}: pass the folder TF Serving watches "
                "(--model_base_path), one of its own")
    return None


def server_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`python -m serving.server`'s options; exits with a usage error (status 2) or the help."""
    parser = argtypes.Parser(prog="python -m serving.server",
                                     description=SERVER_DESCRIPTION,
                                     formatter_class=argtypes.DefaultsHelpFormatter)
    parser.add_argument("--model-base-path", required=True, type=argtypes.tensorflow_folder,
                        help="folder of integer versions")
    parser.add_argument("--model-name", required=True, type=model_name,
                        help="name clients put in model_spec.name")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1: loopback only)")
    parser.add_argument("--port", type=argtypes.port, default=8500,
                        help="gRPC port (0 = any free port)")
    parser.add_argument("--enable-batching", action="store_true",
                        help="merge concurrent requests into one model call")
    parser.add_argument("--max-batch-size", type=SERVER_COUNT,
                        help="with --enable-batching: rows per merged call (a request of more "
                             "rows is INVALID_ARGUMENT, as TF Serving's; default: "
                             f"{BATCHING_DEFAULTS['max_batch_size']})")
    parser.add_argument("--batch-timeout-micros", type=BATCH_TIMEOUT_MICROS,
                        help="with --enable-batching: how long a batch waits for more requests "
                             "(0 = take what is queued; default: "
                             f"{BATCHING_DEFAULTS['batch_timeout_micros']})")
    parser.add_argument("--num-batch-threads", type=SERVER_COUNT,
                        help="with --enable-batching: merged calls that may run at the same "
                             f"time (default: {BATCHING_DEFAULTS['num_batch_threads']})")
    parser.add_argument("--grpc-max-threads", type=GRPC_THREADS, default=None,
                        help="calls served at once (TF Serving's --grpc_max_threads); more "
                             "wait their turn. Without --enable-batching it bounds the model "
                             "calls running at once and their memory; with it, the requests "
                             "one merged call can hold (default: 4 per CPU, at least 8)")
    parser.add_argument("--poll-seconds", type=POLL_SECONDS, default=1.0,
                        help="how often the base path is scanned for new versions")
    parser.add_argument("--max-message-mb", type=argtypes.message_mb, default=16,
                        help="request and response size cap")
    parser.add_argument("--max-sequence-width", type=SERVER_COUNT,
                        default=MAX_SEQUENCE_WIDTH,
                        help="the widest item-id input (session_items, history_items) a "
                             "request may send; wider is RESOURCE_EXHAUSTED (the model's work "
                             "grows with the width, padding included)")
    parser.add_argument("--max-sequence-items", type=SERVER_COUNT,
                        default=MAX_SEQUENCE_ITEMS,
                        help="the most item slots (rows x width) one item-id input may hold; "
                             "more is RESOURCE_EXHAUSTED, and a merged batch holds no more")
    parser.add_argument("--max-request-rows", type=SERVER_COUNT,
                        default=MAX_REQUEST_ROWS,
                        help="the most rows (users) one request may send; more is "
                             "RESOURCE_EXHAUSTED (next_items scores each row over the whole "
                             "catalogue)")
    parser.add_argument("--num-versions", type=SERVER_COUNT, default=1,
                        help="how many of the newest versions stay loaded (TF Serving's "
                             "latest{num_versions}); >1 lets pinned clients finish on the old one")
    parser.add_argument("--max-num-load-retries", type=LOAD_RETRIES, default=5,
                        help="times a version that failed to load is tried again, "
                             "--load-retry-interval-micros apart (TF Serving's "
                             "--max_num_load_retries); a version whose files change is tried "
                             "again at once")
    parser.add_argument("--load-retry-interval-micros", type=LOAD_RETRY_INTERVAL_MICROS,
                        default=60_000_000,
                        help="wait between those tries (TF Serving's "
                             "--load_retry_interval_micros)")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    args = parser.parse_args(argv)
    given = [f"--{key.replace('_', '-')}" for key in BATCHING_DEFAULTS
             if getattr(args, key) is not None]
    if given and not args.enable_batching:  # (they were taken and did nothing)
        parser.error(f"{' and '.join(given)} set{'s' * (len(given) == 1)} how requests are "
                     "merged, which only --enable-batching does: add it, or leave "
                     f"{'them' if len(given) > 1 else 'it'} out")
    for key, default in BATCHING_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    return args
