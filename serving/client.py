"""gRPC client for a HierTCN export served by TF Serving or serving.server (README § 3).

    client = HierTCNClient("127.0.0.1:8500", "hiertcn", timeout=5.0)
    version = client.pin()                       # latest version, used by every call
    states = client.zero_states(1)               # a new user
    ids, scores = client.next_items(states, [["a", "b"]], k=10)
    states = client.update_state(states, [["a", "b", "c"]])   # the session ended

A user's state belongs to the version that computed it, so a client pins one version
(`pin()`) and uses it for both the recommendation and the state update of a user.

CLI (state kept in SQLite by serving.state_store):

    python -m serving.client --target HOST:PORT --model-name NAME [--state-db FILE] \\
        {recommend --user U [--items a,b,c] [-k 10] | end-session --user U --items a,b,c | status}
    (--items-json '["a,b", "c"]' instead of --items for ids with commas in them)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

if __name__ == "__main__":  # the command line needs TensorFlow's messages, not its runtime
    from pipeline import argtypes as _argtypes
    from serving import quiet

    _argtypes.interrupts_in_one_line("interrupted: nothing was stored")  # (in the imports)
    _argtypes.sigterm_until_handled()

    if not quiet.tensorflow_protos_only():
        with quiet.native_notes_dropped():  # its import-time CUDA notes are noise here
            import tensorflow  # noqa: F401

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from pipeline import argtypes
from serving import cli, protos, state_store

SIG_UPDATE_STATE = "update_state"
SIG_NEXT_ITEMS = "next_items"
SIG_USER_EMBEDDING = "user_embedding"
SIG_KNOWN_ITEMS = "known_items"
PAD = ""
# The fixed probe of `HierTCNClient.fingerprint`: an id no catalogue holds (the unknown
# item's embedding) and the top scores of a new user.
PROBE_ITEM = "\x00hiertcn-fingerprint-probe"
PROBE_K = 16


class ServingError(Exception):
    """A failed call; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ModelNotFound(ServingError):
    """The server has no such model or version (NOT_FOUND)."""


class InvalidRequest(ServingError):
    """The server rejected the inputs (INVALID_ARGUMENT, FAILED_PRECONDITION, too large)."""


class ServerUnavailable(ServingError):
    """No answer in time, no server at the target or none ready (UNAVAILABLE,
    DEADLINE_EXCEEDED), or a server that stopped during the call (CANCELLED)."""


_ERRORS = {
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailable,
    grpc.StatusCode.CANCELLED: ServerUnavailable,  # (this client cancels no call)
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What GetModelMetadata says about one version.

    Attributes:
      version: the version number.
      state_size: H, the width of `user_state`.
      signatures: signature name → SignatureDef.
      k_per_row: `next_items` takes `k` as one value per row ([B]; exports since
        2026-12-02, which TF Serving's batching needs) besides a scalar.
    """

    version: int
    state_size: int
    signatures: dict
    k_per_row: bool = False


def pad_rows(rows: Sequence[Sequence[str]], width: int | None = None,
             pad_first: bool = False) -> np.ndarray:
    """Ragged id lists → object array [B, W] padded with "" at the end.

    Args:
      rows: B lists of item ids.
      width: None: W = the longest row (at least 1). Else W = width, or, for rows longer
        than `width`, the next multiple of it.
      pad_first: each row gets the pad id "" before its ids (counted in the width).

    Returns:
      object [B, W].

    Raises:
      TypeError: a row that is a string rather than a list of ids (it would be read as its
        characters), or an id that is not a string (an integer id is not the string the
        vocabulary holds: it would be scored as an unknown item).
    """
    for i, row in enumerate(rows):
        state_store.check_session(row, f"row {i}")
    if pad_first:
        rows = [[PAD, *row] for row in rows]
    longest = max([len(r) for r in rows] + [1])
    if width is None:
        cols = longest
    else:
        cols = -(-longest // width) * width
    out = np.full([len(rows), cols], PAD, dtype=object)
    for i, row in enumerate(rows):
        out[i, :len(row)] = list(row)
    return out


def _decode_ids(arr: np.ndarray) -> list[list[str]]:
    return [[v.decode("utf-8") for v in row] for row in arr.tolist()]


def _version_value(version) -> int:
    """A version number as TF Serving holds it (int64), or a one-line ValueError."""
    if not 0 <= int(version) <= protos.MAX_VERSION:
        raise ValueError(f"version must be an integer from 0 to {protos.MAX_VERSION} "
                         f"(TF Serving's int64 version numbers), got {version}")
    return int(version)


class HierTCNClient:
    """One channel and its stubs to a TF Serving–compatible server."""

    def __init__(self, target: str, model_name: str, timeout: float = 10.0,
                 max_message_mb: int = 16, session_width: int | None = None,
                 history_width: int | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_server_name: str | None = None):
        """Creates the channel (lazily connected).

        Args:
          target: HOST:PORT.
          model_name: the served model's name (TF Serving's --model_name).
          timeout: seconds per call.
          max_message_mb: cap on request and response size.
          session_width: fixed width of `session_items`, for TF Serving's batching, which
            only merges equal shapes: a longer session goes out whole, a multiple of it
            wide (with `pad_variable_length_inputs` TF Serving pads the narrower requests
            of a batch), so that the scores are the ragged request's for every model.
            None: the longest session of the call.
          history_width: fixed width of `history_items`, likewise; None: the longest.
          tls: connect with TLS (a server behind TLS: TF Serving's --ssl_config_file, a
            load balancer), checking the server's certificate against `tls_ca` (a PEM
            file of root certificates) or the system's roots.
          tls_server_name: the name the certificate must carry when it is not the target's
            host (an IP address, a tunnel).

        Raises:
          ValueError: `tls_ca` cannot be read, TLS options without `tls`, or a width,
            timeout or message size that is not positive.
        """
        for name, value in (("session_width", session_width), ("history_width", history_width)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if not (timeout is None or timeout > 0) or not max_message_mb > 0:
            raise ValueError(f"timeout (seconds, or None: no deadline) and max_message_mb "
                             f"must be positive, got {timeout} and {max_message_mb}")
        self.target = target
        self.model_name = model_name
        self.timeout = timeout
        self.session_width = session_width
        self.history_width = history_width
        self.pinned_version: int | None = None
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit)]
        if not tls and (tls_ca or tls_server_name):
            raise ValueError("--tls-ca and --tls-server-name need --tls")
        if tls:
            roots = None
            if tls_ca:
                try:
                    with open(tls_ca, "rb") as f:
                        roots = f.read()
                except OSError as e:
                    raise ValueError(f"cannot read --tls-ca: {e}") from None
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._info: dict[int, ModelInfo] = {}
        self._fingerprints: dict[int, np.ndarray] = {}

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> "HierTCNClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code()
            cls = _ERRORS.get(code, ServingError)
            raise cls(f"{code.name}: {e.details()} (model {self.model_name!r} at {self.target})",
                      code) from None

    def _spec(self, spec, version: int | None, signature: str | None = None,
              pinned: bool = True) -> None:
        """Fills a request's model spec: `version`, else the pinned one (with `pinned`), else
        none (the server's latest)."""
        spec.name = self.model_name
        if pinned and version is None:
            version = self.pinned_version
        if version is not None:
            spec.version.value = _version_value(version)
        if signature:
            spec.signature_name = signature

    def status(self) -> list[dict]:
        """Every version the server knows: [{"version", "state", "error"}], ascending.

        Raises:
          ModelNotFound, ServerUnavailable: see the class docs.
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        response = self._call(self._models.GetModelStatus, request)
        states = get_model_status_pb2.ModelVersionStatus.State
        # (ascending whichever order the server lists them: TF Serving's is newest first)
        return [{"version": s.version, "state": states.Name(s.state),
                 "error": s.status.error_message}
                for s in sorted(response.model_version_status, key=lambda s: s.version)]

    def metadata(self, version: int | None = None, pinned: bool = True) -> ModelInfo:
        """The signatures and state size of a version (None: the pinned one, or the latest
        when none is pinned or not `pinned`)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, version, pinned=pinned)
        response = self._call(self._predict.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        signatures = dict(sig_map.signature_def)
        version = int(response.model_spec.version.value)
        state = signatures.get(SIG_UPDATE_STATE)
        state = state.inputs.get("user_state") if state is not None else None
        if (state is None or SIG_NEXT_ITEMS not in signatures or not state.tensor_shape.dim
                or state.tensor_shape.dim[-1].size < 1):
            names = ", ".join(sorted(n for n in signatures if not n.startswith("__"))) or "none"
            raise InvalidRequest(
                f"model {self.model_name!r} version {version} at {self.target} is not a HierTCN "
                f"export (signatures {names}; expected "
                f"{SIG_UPDATE_STATE} with a user_state [B, H] input and {SIG_NEXT_ITEMS}): "
                "check --model-name, or export the run with serving.export")
        k = signatures[SIG_NEXT_ITEMS].inputs.get("k")
        k_per_row = k is not None and (k.tensor_shape.unknown_rank or len(k.tensor_shape.dim) == 1)
        info = ModelInfo(version, int(state.tensor_shape.dim[-1].size), signatures, k_per_row)
        self._info[info.version] = info
        return info

    def pin(self, version: int | None = None) -> int:
        """Pins `version` (default: the server's latest) for every later call; returns it.
        A failed call (a bad number, a version not served, the server out of reach) leaves
        the pin as it was, and calls of other threads meanwhile keep it."""
        if version is not None:
            _version_value(version)
        self.pinned_version = self.metadata(version, pinned=False).version
        self._fingerprints.pop(self.pinned_version, None)  # its folder may have been replaced
        return self.pinned_version

    def fingerprint(self, version: int | None = None) -> np.ndarray:
        """What tells this model from another one exported under the same version number
        (a new export base numbers from 1 again): float32, the state after one session of
        an unknown item from zeros, then a new user's top `PROBE_K` scores. Two calls on
        the first use of a version (pinned, or latest), cached until it is pinned again.
        """
        version = self.pinned_version if version is None else int(version)
        if version is None:
            version = self.metadata().version
        if version not in self._fingerprints:
            zeros = self.zero_states(1, version)
            state = self.update_state(zeros, [[PROBE_ITEM]], version)
            _, scores = self.next_items(zeros, [[]], PROBE_K, [[]], version)
            self._fingerprints[version] = np.concatenate(
                [state[0], np.sort(scores[0])]).astype(np.float32)
        return self._fingerprints[version]

    def info(self, version: int | None = None) -> ModelInfo:
        """A version's metadata (pinned, or latest), read once per version."""
        key = self.pinned_version if version is None else version
        if key in self._info:
            return self._info[key]
        return self.metadata(version)

    def state_size(self, version: int | None = None) -> int:
        """H of a version (pinned, or latest)."""
        return self.info(version).state_size

    def zero_states(self, batch: int, version: int | None = None) -> np.ndarray:
        """float32 [batch, H] zeros: the state of new users."""
        return np.zeros([batch, self.state_size(version)], np.float32)

    def predict(self, signature: str, inputs: dict[str, Any],
                version: int | None = None) -> tuple[dict[str, np.ndarray], int]:
        """One Predict call; returns (outputs, the version that ran).

        Raises:
          ModelNotFound, InvalidRequest, ServerUnavailable, ServingError.
        """
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, version, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(protos.to_proto(value))
        response = self._call(self._predict.Predict, request)
        outputs = {k: protos.from_proto(v) for k, v in response.outputs.items()}
        return outputs, int(response.model_spec.version.value)

    def update_state(self, states: Any, sessions: Sequence[Sequence[str]],
                     version: int | None = None) -> np.ndarray:
        """States after the sessions ended.

        Args:
          states: float32 [B, H].
          sessions: B lists of item ids (the whole session each).
          version: overrides the pinned version.

        Returns:
          float32 [B, H].
        """
        # "" first with a fixed width: TF Serving's batching pads a narrower request with its
        # first value (`pad_variable_length_inputs`), which is then the pad id the export ignores
        out, _ = self.predict(SIG_UPDATE_STATE, {
            "user_state": np.asarray(states, np.float32),
            "session_items": pad_rows(sessions, self.session_width,
                                      pad_first=self.session_width is not None)}, version)
        return out["user_state"]

    def next_items(self, states: Any, sessions: Sequence[Sequence[str]], k: int = 10,
                   history: Sequence[Sequence[str]] | None = None,
                   version: int | None = None,
                   exclude: Sequence[Iterable[str]] | None = None
                   ) -> tuple[list[list[str]], np.ndarray]:
        """Top-k next items.

        Args:
          states: float32 [B, H].
          sessions: B lists of the current session's item ids so far (may be empty).
          k: items per user (the server clamps to the catalogue size).
          history: B lists of the users' recent item ids, newest last (optional).
          version: overrides the pinned version.
          exclude: B collections of item ids not to answer (the items a user already
            bought or rated: `model.evaluate --rule-out-seen`'s filter), or None. The
            server is asked for k plus the longest one and each row's are dropped here.

        Returns:
          (item ids [B][k'], scores float32 [B, k']), best first; k' < k only where the
          catalogue, less a row's excluded items, holds fewer (then the fewest of a row).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got the {type(k).__name__} {k!r}")
        if k < 0:  # (the server's answer was the export's graph assertion, verbatim)
            raise InvalidRequest(f"k must be >= 0, got {k}")
        drop = None
        if exclude is not None:
            if isinstance(exclude, (str, bytes)) or len(exclude) != len(sessions):
                given = "a string" if isinstance(exclude, (str, bytes)) else len(exclude)
                raise InvalidRequest(f"{len(sessions)} sessions but {given} exclude lists: one "
                                     "collection of ids per user")
            for r, row in enumerate(exclude):  # (a string's characters are not its ids)
                if isinstance(row, (str, bytes)):
                    raise InvalidRequest(f"exclude's row {r} is the string {row!r}: one "
                                         "collection of ids per user, e.g. [[\"a\", \"b\"], []]")
            # (ids as the export reads them: exactly but for spaces at their ends)
            drop = [{str(i).strip() for i in row} for row in exclude]
        asked = min(k + max(map(len, drop), default=0), 2**31 - 1) if drop else k
        inputs = self._scoring_inputs(states, sessions, history)
        info = self.info(version)
        version = info.version  # the version whose signature says how to send k
        # one k per row where the export takes it: TF Serving's batching needs it, and
        # then answers each row with the batch's largest k (cut back to ours below)
        inputs["k"] = (np.full([len(inputs["user_state"])], asked, np.int32)
                       if info.k_per_row else np.int32(asked))
        out, _ = self.predict(SIG_NEXT_ITEMS, inputs, version)
        ids, scores = _decode_ids(out["item_ids"][:, :asked]), out["scores"][:, :asked]
        if drop is None:
            return ids, scores
        kept = [[j for j, i in enumerate(row) if i not in d] for row, d in zip(ids, drop)]
        width = min([k] + [len(row) for row in kept])
        kept = [row[:width] for row in kept]
        return ([[row[j] for j in at] for row, at in zip(ids, kept)],
                np.asarray([scores[r, at] for r, at in enumerate(kept)],
                           np.float32).reshape(len(kept), width))

    def user_embedding(self, states: Any, sessions: Sequence[Sequence[str]],
                       history: Sequence[Sequence[str]] | None = None,
                       version: int | None = None) -> np.ndarray:
        """User embeddings float32 [B, D] for an external nearest-neighbour index."""
        out, _ = self.predict(SIG_USER_EMBEDDING, self._scoring_inputs(states, sessions, history),
                              version)
        return out["embedding"]

    def known_ids(self, ids: Sequence[str], version: int | None = None) -> set[str] | None:
        """The ids among `ids` that the version (pinned, or latest) knows; None for an
        export without the `known_items` signature (before 2026-12-04). The state store
        keeps the newest known ids a repeat head reads with this (`state_store.end_session`)."""
        info = self.info(version)
        if SIG_KNOWN_ITEMS not in info.signatures:
            return None
        ids = list(dict.fromkeys(ids))  # each distinct id once
        if not ids:
            return set()
        out, _ = self.predict(SIG_KNOWN_ITEMS, {"items": pad_rows([ids], None)}, info.version)
        return {i for i, known in zip(ids, np.asarray(out["known"])[0]) if known}

    def _scoring_inputs(self, states: Any, sessions: Sequence[Sequence[str]],
                        history: Sequence[Sequence[str]] | None) -> dict[str, np.ndarray]:
        history = history if history is not None else [[] for _ in sessions]
        if len(history) != len(sessions):  # (zip below dropped the rows of the longer)
            raise InvalidRequest(f"{len(sessions)} sessions but {len(history)} histories: "
                                 "one of each per user")
        # Fixed widths: a longer row goes out a multiple of the width wide, whole, as
        # update_state's sessions do, "" first (the pad TF Serving's batching then uses).
        # Cut to the newest items, the scores were other ones: a GRU, the flat TCN and a
        # session summary read every item of the session (GRU4Rec on ML-100K: 5,599 of
        # 8,824 ranks moved), and a stored history holds the newest known ids with the
        # unknown ones among them, which pushed known ones out (parity audit).
        first = self.session_width is not None or self.history_width is not None
        return {"user_state": np.asarray(states, np.float32),
                "session_items": pad_rows(sessions, self.session_width, pad_first=first),
                "history_items": pad_rows(history, self.history_width, pad_first=first)}


def _resolve(client: HierTCNClient, store: state_store.StateStore,
             user: str) -> state_store.ResolvedState:
    version = client.pinned_version  # (pinned by `main` before the store was opened)
    update = lambda state, session: client.update_state(state[None], [session])[0]  # noqa: E731
    args = (store, user, version, client.state_size(), update)
    kwargs = dict(fingerprint=client.fingerprint(), known_items=_known_items(client))
    try:
        return state_store.resolve_state(*args, **kwargs)
    except state_store.StateConflict:  # rebuilt while another process wrote the user
        return state_store.resolve_state(*args, **kwargs)


def _known_items(client: HierTCNClient) -> state_store.KnownFn | None:
    """The pinned version's `known_ids`, or None where its export cannot say."""
    if SIG_KNOWN_ITEMS not in client.info().signatures:
        return None
    return lambda ids: client.known_ids(ids)


def _items(args: argparse.Namespace) -> list[str]:
    """--items a,b,c, or --items-json '["a,b", "c"]' for ids with commas in them."""
    if getattr(args, "items_json", None) is not None:
        return list(args.items_json)
    return [t.strip() for t in (getattr(args, "items", None) or "").split(",") if t.strip()]


def _json_items(text: str) -> list[str]:
    """A JSON list of item ids, or `@FILE` (`@-`: standard input) holding one: a session of
    many thousand ids does not fit a command line (one argument is at most 128 KB)."""
    given = text
    if text.startswith("@"):
        # (`@~/f.json`: the shell expands no ~ after the @; the home folder, as every path)
        where = "standard input" if text == "@-" else argtypes.home_path(text[1:])
        try:
            if not where:
                raise argparse.ArgumentTypeError("@ needs a file name: @FILE, or @- for "
                                                 "standard input")
            if text == "@-":
                if sys.stdin is None:  # (closed: `<&-`)
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                text = sys.stdin.read()
            else:
                # (utf-8-sig: a byte-order mark, as Windows tools write, is not content)
                with open(where, encoding="utf-8-sig") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
            raise argparse.ArgumentTypeError(f"cannot read {where}: {reason}") from None
    try:
        items = json.loads(text)
    except ValueError:
        items = None
    shown = given if given.startswith("@") else repr(text[:200])
    if not isinstance(items, list):
        raise argparse.ArgumentTypeError(f"must be a JSON list of item ids, got {shown}")
    bad = [i for i in items if not isinstance(i, str)]
    if bad:
        # (a number is not the id the catalogue holds: items.tsv's ids are strings)
        number = json.dumps(bad[0]) if isinstance(bad[0], (int, float)) \
            and not isinstance(bad[0], bool) else "1"
        raise argparse.ArgumentTypeError(f"item ids must be JSON strings ({json.dumps(number)}, "
                                         f"not {number}), got {shown}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"item ids must not be empty (\"\" pads), got {shown}")
    return items


# forget and prune, where another process's read kept the -wal file from being emptied
JOURNAL_KEPT = ("note: another process was reading {path}: its -wal file may still hold "
                "the deleted records' old pages; run this command again once that process "
                "is done to empty it")
# prune --inactive-days: more than 0 (a user is inactive from the moment of a write) and at
# most 100,000 days (274 years: a cut-off time before the epoch keeps everyone)
INACTIVE_DAYS = argtypes.number(float, 0.0, strict=True, high=100_000.0)


def main(argv: Sequence[str] | None = None, command: bool = False) -> int:
    """CLI entry point; returns the exit status. `command` (`python -m serving.client`):
    stop signals are ignored once an end-session is stored."""
    parser = argtypes.Parser(prog="python -m serving.client",
                                     description="Query a served HierTCN model over gRPC.",
                                     formatter_class=argtypes.DefaultsHelpFormatter)
    cli.add_connection_args(parser, timeout=10.0)
    parser.add_argument("--model-name", type=cli.model_name,
                        help="the served model's name (required but for forget and prune)")
    parser.add_argument("--state-db", default="user_states.sqlite", type=cli.state_db,
                        help="SQLite file of user states (created when missing, but by "
                             "forget and prune)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--history-width", type=argtypes.positive_int, default=None,
                        help="fixed history_items width (for TF Serving with --enable_batching)")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("recommend", help="next items for a user's current session")
    rec.add_argument("--user", required=True)
    given = rec.add_mutually_exclusive_group()
    given.add_argument("--items", default="", help="the current session so far: a,b,c")
    given.add_argument("--items-json", type=_json_items, metavar="JSON",
                       help='the same as a JSON list, for ids with commas: \'["a,b", "c"]\'; '
                            '@FILE reads it from a file (@-: standard input), for a long '
                            'session')
    rec.add_argument("-k", type=argtypes.top_k, default=10, help="how many items (default: 10)")
    rec.add_argument("--keep-last", action="store_true",
                     help="keep the session's last item in the answer (left out by default: "
                          "the pipeline collapses immediate repeats, so it is never the next "
                          "item the model was trained to predict)")
    rec.add_argument("--exclude-seen", action="store_true",
                     help="leave out every item of the session and of the user's stored "
                          "history (the store's last N items; the 'already bought or rated' "
                          "filter: HierTCNClient.next_items(exclude=...) takes a whole list)")
    end = commands.add_parser("end-session", help="fold a finished session into the user's state")
    end.add_argument("--user", required=True)
    given = end.add_mutually_exclusive_group(required=True)
    given.add_argument("--items", help="the finished session: a,b,c")
    given.add_argument("--items-json", type=_json_items, metavar="JSON",
                       help='the same as a JSON list, for ids with commas: \'["a,b", "c"]\'; '
                            '@FILE reads it from a file (@-: standard input), for a long '
                            'session')
    commands.add_parser("status", help="the versions the server lists: AVAILABLE, LOADING, or END (unloaded, or failed to load); exit status 1 when none is AVAILABLE")
    forget = commands.add_parser("forget", help="delete a user's stored states and history "
                                 "(in --state-db; no server needed)")
    forget.add_argument("--user", required=True)
    prune = commands.add_parser(
        "prune", help="delete the records of users whose newest record is older than "
        "--inactive-days (in --state-db; no server needed)")
    prune.add_argument("--inactive-days", type=INACTIVE_DAYS, required=True, metavar="DAYS",
                       help="a user whose newest record (end-session, backfill or a "
                            "rebuild by recommend) was written more than DAYS days ago goes")
    prune.add_argument("--dry-run", action="store_true", help="count them, delete nothing")
    prune.add_argument("--vacuum", action="store_true",
                       help="then give the freed space back to the disk (rewrites the file: "
                            "it needs as much room free, and writers wait while it runs)")
    prune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for sub in commands.choices.values():  # --json after the command as well as before it
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "prune":
        return _prune(args)
    if args.command != "forget" and not args.model_name:
        parser.error(f"{args.command} needs --model-name")
    if args.command == "end-session" and not _items(args):
        parser.error("end-session needs --items a,b,c")
    wrong = cli.connection_error(args, server=args.command != "forget")
    if wrong:
        parser.error(wrong)
    if args.command != "status":
        # the pipeline strips ids' ends (spaces, tabs, no-break spaces): ' u1 ' of a log is
        # the user u1 that serving.backfill stores, so the same user here
        args.user = args.user.strip()
        if not args.user:
            parser.error("--user must not be empty")
        for name, text in (("user", args.user), ("items", ",".join(_items(args)))):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                parser.error(f"--{name} is not UTF-8 text (check the terminal's encoding)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "forget":
        if not os.path.isfile(args.state_db):
            print(f"error: state database {args.state_db} does not exist", file=sys.stderr)
            return 1
        try:
            with state_store.SQLiteStateStore(args.state_db) as store:
                deleted = store.delete(args.user)
                erased = _journal_erased(store)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        text = (f"user {args.user}: deleted {deleted} stored record{'s' * (deleted != 1)} "
                f"from {args.state_db}")
        if not erased:
            print(JOURNAL_KEPT.format(path=args.state_db), file=sys.stderr)
        print(json.dumps({"user": args.user, "deleted": deleted, "journal_erased": erased})
              if args.json else text)
        return 0
    # end-session: stored and said, or neither. A stop signal from its start to its answer
    # is dropped (one that said "interrupted" of a stored session made a retry store it
    # twice); as a command, the process then ignores them until it exits.
    held, said = contextlib.ExitStack(), False
    # (a store this command makes, removed again where the call fails before it holds a
    # record: a deadline passed after the pin left an empty file)
    new_store = args.command != "status" and not os.path.exists(args.state_db)
    try:
        with argtypes.sigterm_as_interrupt(), held, \
                HierTCNClient(args.target, args.model_name, args.timeout,
                              session_width=args.session_width,
                              history_width=args.history_width, tls=args.tls,
                              tls_ca=args.tls_ca, tls_server_name=args.tls_server_name) as client:
            if args.command == "status":
                result, text = _status(client)
            else:
                client.pin()  # (an unreachable server stops here, before the store is created)
                with state_store.SQLiteStateStore(args.state_db) as store:
                    if args.command == "recommend":
                        result, text = _on_latest(client, lambda: _recommend(client, store, args))
                    else:
                        held.enter_context(argtypes.stop_signals_held(deliver=False))
                        result, text = _on_latest(
                            client, lambda: _end_session(client, store, args))
                        if command:
                            held.callback(argtypes.ignore_stop_signals)
            if args.command == "end-session":
                print(json.dumps(result) if args.json else text, flush=True)
                said = True
                return 0
    except (ServingError, ValueError, state_store.StateConflict) as e:
        if new_store:
            state_store.remove_if_no_record(args.state_db)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        if said:  # (as the call ended, in a process that goes on: stored and said)
            return 0
        print("interrupted" + ("; nothing was stored" if args.command == "end-session" else ""),
              file=sys.stderr)
        return 130
    print(json.dumps(result) if args.json else text)
    if args.command == "status" and not any(v["state"] == "AVAILABLE"
                                            for v in result["versions"]):
        return 1  # (a health check: nothing serves; the report above says why)
    return 0


def _journal_erased(store: state_store.SQLiteStateStore) -> bool:
    """Whether the store's -wal file was emptied after its deletes: as the store's own
    delete, prune or vacuum left it, or emptied now where none of them ran."""
    return store.journal_erased if store.journal_erased is not None else store.erase_journal()


def _prune(args: argparse.Namespace) -> int:
    """`prune`: the records of users inactive for `--inactive-days`, deleted in batches (a
    stop keeps the batches done: run it again to go on), then `--vacuum`."""
    if not os.path.isfile(args.state_db):
        print(f"error: state database {args.state_db} does not exist", file=sys.stderr)
        return 1
    before = time.time() - args.inactive_days * 86_400
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(before))
    done = None
    from tqdm import tqdm
    bar = tqdm(desc="prune", unit="user", file=sys.stderr, mininterval=1.0,
               disable=args.no_progress or args.json or not sys.stderr.isatty())
    try:
        with argtypes.sigterm_as_interrupt(), bar, \
                state_store.SQLiteStateStore(args.state_db) as store:
            done = store.prune(before, dry_run=args.dry_run, progress=bar.update)
            size = os.path.getsize(args.state_db)
            free = store.free_bytes()
            if args.vacuum and not args.dry_run:
                store.vacuum()
            erased = args.dry_run or _journal_erased(store)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted" + ("" if args.dry_run else
                               "; the users pruned so far stay deleted: run it again to go on"),
              file=sys.stderr)
        return 130
    vacuumed = args.vacuum and not args.dry_run
    after = os.path.getsize(args.state_db) if vacuumed else size
    if not erased:
        print(JOURNAL_KEPT.format(path=args.state_db), file=sys.stderr)
    result = {"state_db": args.state_db, "before": when, "dry_run": args.dry_run,
              "users": done.users, "records": done.records, "kept_users": done.kept_users,
              "free_bytes": free, "file_bytes": after, "vacuumed": vacuumed}
    if args.json:
        print(json.dumps(result))
        return 0
    verb = "would prune" if args.dry_run else "pruned"
    text = (f"{verb} {done.users:,} user{'s' * (done.users != 1)} ({done.records:,} "
            f"record{'s' * (done.records != 1)}) whose newest record was written before "
            f"{when}; {done.kept_users:,} kept: {args.state_db}")
    if args.dry_run:
        text += " (--dry-run: nothing deleted)"
    elif vacuumed:
        text += f"; vacuumed: {size / 2**20:,.1f} MB -> {after / 2**20:,.1f} MB"
    elif free:
        text += (f"; {free / 2**20:,.1f} MB free inside the file, reused by later writes "
                 "(--vacuum gives it back to the disk)")
    print(text)
    return 0


def _status(client: HierTCNClient) -> tuple[dict, str]:
    versions = client.status()
    text = "\n".join(f"{client.model_name} version {v['version']}: {v['state']}"
                     + (f" ({v['error']})" if v["error"] else
                        " (unloaded)" if v["state"] == "END" else "") for v in versions)
    return {"model": client.model_name, "versions": versions}, text


def _recommend(client: HierTCNClient, store: state_store.StateStore,
               args: argparse.Namespace) -> tuple[dict, str]:
    """Top-k for the user's current session, from the stored state of the pinned version."""
    resolved = _resolve(client, store, args.user)
    items = _items(args)
    # the item the user is on is never their next one (the pipeline collapses immediate
    # repeats): HierTCN's export already gives it probability 0, a baseline's may rank it
    # first (a new user's only seen item); left out either way
    left_out = items[-1].strip() if items and not args.keep_last else None  # (as looked up)
    drop = {left_out} - {None}
    if args.exclude_seen:
        drop.update(i.strip() for i in items)
        drop.update(resolved.history)
    k = min(args.k + len(drop), 2**31 - 1)  # (an int32 input)
    ids, scores = client.next_items(resolved.state[None], [items], k, [resolved.history])
    ranked = [{"item": i, "score": float(s)} for i, s in zip(ids[0], scores[0])
              if i not in drop][:args.k]
    result = {"user": args.user, "version": client.pinned_version, "state": resolved.source,
              "session": items, "items": ranked}
    unknown = _unknown_ids(client, items)
    result["unknown_items"] = unknown
    lines = [f"{resolved.message}; model {client.model_name} version {client.pinned_version}"]
    cut = _cut_at_commas(client, args, unknown or ())
    result["cut_at_commas"] = cut
    lines += _unknown_note(client, items, unknown, cut)
    lines += _new_user_note(resolved, resolved.source == "new" and store.holds_any() is False)
    if len(ranked) < args.k and len(ids[0]) < k:  # (a catalogue of fewer: said, not bare)
        dropped = len(drop.intersection(ids[0]))
        lines.append(f"note: {len(ranked)} of the {args.k:,} asked: version "
                     f"{client.pinned_version}'s catalogue holds {len(ids[0]):,} items"
                     + (f", and the {dropped:,} seen in the session or the stored history "
                        "are left out (--exclude-seen)" if args.exclude_seen and dropped else
                        ", and the one the session is on is left out (--keep-last keeps it)"
                        if left_out in ids[0] else ""))
    lines += [f"{r + 1:3d}. {argtypes.shown(e['item'])}\t{e['score']:.4f}"
              for r, e in enumerate(ranked)]
    return result, "\n".join(lines)


def _unknown_ids(client: HierTCNClient, items: Sequence[str]) -> list[str] | None:
    """The session's distinct ids the pinned version does not know, in order; None when
    its export cannot say (no `known_items` signature)."""
    known = client.known_ids(items, client.pinned_version) if items else set()
    return None if known is None else list(dict.fromkeys(i for i in items if i not in known))


# the most characters of an id a note shows (a 2,000,000-character id was a line that long)
SHOWN_ID_CHARS = 100


def _unknown_note(client: HierTCNClient, items: Sequence[str],
                  unknown: list[str] | None, cut: str | None = None) -> list[str]:
    """A line naming the session's items the pinned version does not know: they are read
    as the unknown item, so an id in the wrong case or form gives a generic answer without
    a word; and `cut`, an id of the catalogue that --items cut at its commas."""
    if not unknown:
        return []
    shown = ", ".join(repr(i if len(i) <= SHOWN_ID_CHARS else i[:SHOWN_ID_CHARS] + "...")
                      for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    distinct = len(set(items))
    which = ("the session's one item is" if distinct == 1 else
             f"{len(unknown)} of the session's {distinct} distinct items "
             + ("is" if len(unknown) == 1 else "are"))
    return [f"note: {which} not in version {client.pinned_version}'s catalogue ({shown}): "
            f"{'it' if len(unknown) == 1 else 'each'} is read as the "
            "unknown item; ids are matched as the pipeline read them: exactly but for "
            "spaces at their ends (case and form as in the training log)"
            + (f"; --items cut {cut!r}, an id of the catalogue, at its commas: "
               f"{_cut_hint(cut)}" if cut else "")]


def _cut_hint(cut: str) -> str:
    """How to pass a session holding `cut`, an id with commas that --items cut."""
    return f"pass the session as --items-json '[..., {json.dumps(cut)}, ...]'"


def _cut_at_commas(client: HierTCNClient, args: argparse.Namespace,
                   unknown: Sequence[str]) -> str | None:
    """An id of the pinned version's catalogue that --items cut at its commas (two or three
    of its pieces joined again, one of them an `unknown` id), or None."""
    text = getattr(args, "items", None)
    if getattr(args, "items_json", None) is not None or not text or not unknown:
        return None
    pieces, unknown = text.split(","), set(unknown)
    joined = list(dict.fromkeys(
        ",".join(pieces[i:i + n]).strip() for n in (2, 3) for i in range(len(pieces) - n + 1)
        if unknown.intersection(p.strip() for p in pieces[i:i + n])))
    # (a few a piece unknown, in calls no wider than the session: a server's width bound)
    width = max(len(dict.fromkeys(_items(args))), 1)  # (the distinct ids known_ids took)
    for at in range(0, len(joined), width):
        known = client.known_ids(joined[at:at + width], client.pinned_version)
        cut = next((j for j in joined[at:at + width] if j in (known or ())), None)
        if cut is not None:
            return cut
    return None


def _on_latest(client: HierTCNClient, call: Callable[[], Any]) -> Any:
    """`call()` on the pinned version; where the server unloaded that version meanwhile (a
    newer one replaced it: NOT_FOUND for it, as TF Serving answers), pins the new latest
    and calls once more (a failed call stores nothing: its write comes after its calls)."""
    pinned = client.pinned_version
    try:
        return call()
    except ModelNotFound:
        if client.pin() == pinned:  # (still served: the NOT_FOUND was another one)
            raise
        return call()


def _end_session(client: HierTCNClient, store: state_store.StateStore,
                 args: argparse.Namespace) -> tuple[dict, str]:
    """Folds the finished session into the user's state and stores it with the history
    (`state_store.end_session`: a concurrent end-session of the same user is not lost)."""
    items = _items(args)
    version = client.pinned_version  # (pinned by `main` before the store was opened)
    # (before the write: a failure here stores nothing)
    unknown = _unknown_ids(client, items)
    cut = _cut_at_commas(client, args, unknown or ())
    if cut:  # (a state folded from the pieces would stay in the store)
        raise ValueError(f"--items cut {cut!r}, an id of version {version}'s catalogue, at "
                         f"its commas: {_cut_hint(cut)}; nothing was stored")
    empty = store.holds_any() is False  # (before this user's record is written)
    resolved, record = state_store.end_session(
        store, args.user, version, client.state_size(),
        lambda state, session: client.update_state(state[None], [session])[0], items,
        fingerprint=client.fingerprint(), known_items=_known_items(client))
    folded = len(state_store.collapse_repeats(list(items)))  # (as end_session folds it)
    # "sessions": the recent sessions stored with the state; "sessions_total": all the
    # user's (None where the record is uncounted)
    result = {"user": args.user, "version": client.pinned_version, "state": resolved.source,
              "session_items": folded, "sessions": len(record.sessions),
              "sessions_total": record.sessions_total, "history": record.history,
              "unknown_items": unknown}
    repeats = len(items) - folded
    text = (f"{resolved.message}; stored the state after {folded} item{'s' * (folded != 1)}"
            + (f" ({repeats} immediate repeat{'s' * (repeats != 1)} left out, as the "
               "pipeline does)" if repeats else "")
            + f" for version {client.pinned_version} ({len(record.history)} recent items kept)")
    return result, "\n".join([text, *_unknown_note(client, items, unknown),
                              *_new_user_note(resolved, empty)])


def _new_user_note(resolved: state_store.ResolvedState, empty: bool) -> list[str]:
    """A note where a new user's state started at zeros because the store holds no user
    at all: a deployment whose store was never loaded with the users' pasts."""
    if resolved.source != "new" or not empty:
        return []
    return ["note: the state store held no user before this call, so this user started at "
            "zeros, as every user new to it does: "
            "`python -m serving.backfill --data DIR` stores the users' states from the "
            "pipeline output the version was trained on"]


if __name__ == "__main__":
    # (`end-session | head -1` whose reader left: the session is stored, the status says so)
    argtypes.survive_closed_output()
    argtypes.exit_with(main(command=True))
