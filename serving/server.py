"""A TF Serving–compatible gRPC server for local use and tests (README § 3. Serving).

`python -m serving.server --model-base-path EXPORT --model-name NAME [--port 8500]`
serves the versions under EXPORT the way `tensorflow_model_server` does: PredictionService
(`Predict`, `GetModelMetadata`) and ModelService (`GetModelStatus`), the latest version by
default, new version folders picked up by polling (the old version keeps serving until
the new one has loaded and warmed up), and TF Serving's status codes for bad requests:
no model_spec INVALID_ARGUMENT, unknown model or version NOT_FOUND, unknown signature
FAILED_PRECONDITION, missing, extra, mis-typed or mis-shaped inputs INVALID_ARGUMENT, each
message naming the input.

With `--enable-batching`, concurrent requests to the same version and signature (every
input with the batch dimension, as TF Serving requires: `k` one value per row; item-id
inputs of any length, padded with "") are concatenated along the batch dimension, run once
and split again, as TF Serving's `--enable_batching` does: scoring reads the whole item
matrix, so one batch of 8 costs little more than one request. `--batch-timeout-micros`
lets a batch wait for the other clients' requests.
"""
from __future__ import annotations

if __name__ == "__main__":
    import sys

    from model import quiet
    from serving import cli

    cli.server_args(sys.argv[1:])  # a usage error or --help at once, before TensorFlow loads
    quiet.import_tensorflow()  # its start-up notes held back where they are noise

import collections
import concurrent.futures
import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_log_pb2, prediction_service_pb2_grpc, status_pb2)

from pipeline import argtypes, storage
from serving import cli, export, protos

log = logging.getLogger("serving.server")

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
# TensorFlow's error codes are gRPC's (tensorflow/core/protobuf/error_codes.proto)
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
# the method names of the signatures TF Serving's Classify and Regress APIs run
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
SIGNATURE_DEF_FIELD = "signature_def"
# TF Serving's defaults for a version that fails to load (--max_num_load_retries,
# --load_retry_interval_micros)
MAX_LOAD_RETRIES = 5
LOAD_RETRY_INTERVAL_S = 60.0


def default_grpc_threads() -> int:
    """`--grpc-max-threads`' default: 4 per CPU this process may use, at least 8. Each
    thread runs one call at a time, so it bounds the model calls running at once without
    --enable-batching (a call of the largest allowed request holds ~200 MB: 32 of them
    took 6 GB, which the allocator kept) and the requests one merged call can hold with it."""
    return max(8, 4 * storage.usable_cpus())


class RequestError(Exception):
    """A request that cannot be served; carries the gRPC status code to return."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _dims(tensor_info: meta_graph_pb2.TensorInfo) -> list[int] | None:
    shape = tensor_info.tensor_shape
    return None if shape.unknown_rank else [int(d.size) for d in shape.dim]


def _fmt_shape(dims: Sequence[int] | None) -> str:
    if dims is None:
        return "unknown"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"


def graph_error_line(message: str) -> str:
    """The informative line of a TF runtime error (not its 'Graph execution error' frame)."""
    skip = ("Graph execution error", "Detected at node", "<stack traces", "\t", " ")
    lines = [line for line in message.split("\n") if line.strip() and not line.startswith(skip)]
    return lines[0] if lines else message.strip()


def _param_name(key: str) -> str:
    """The parameter name tf.function gives a signature input (its `sanitize_arg_name`)."""
    swapped = "".join(c if c.isalnum() else "_" for c in key)
    return swapped if swapped[:1].isalpha() else "arg_" + swapped


class Signature:
    """One signature of a loaded version, with everything a request needs worked out at load.

    Attributes:
      name: the signature key.
      inputs: input name → (dtype enum, dims or None for unknown rank), sorted by name.
      outputs: the output names.
      batched_inputs, batched_outputs: the names with a variable batch dimension 0.
    """

    def __init__(self, name: str, signature_def: meta_graph_pb2.SignatureDef, function: Any):
        """Binds the loaded signature function for flat calls.

        Raises:
          ValueError: the function does not take exactly one tensor per named input.
        """
        self.name = name
        self.inputs = {n: (t.dtype, _dims(t)) for n, t in sorted(signature_def.inputs.items())}
        self.outputs = frozenset(signature_def.outputs)
        self.batched_inputs = frozenset(n for n, (_, d) in self.inputs.items() if d and d[0] < 0)
        self.batched_outputs = frozenset(n for n, t in signature_def.outputs.items()
                                         if (_dims(t) or [0])[0] < 0)
        # a top-k signature (`next_items`): its [B, k] outputs, which a merged batch computes
        # at the largest k of its requests and `Batcher` cuts back to each request's own
        self.k_input = export.K if export.K in self.inputs \
            and self.inputs[export.K][0] == tf.int32.as_datatype_enum else None
        self.k_outputs = frozenset(n for n, t in signature_def.outputs.items()
                                   if self.k_input and _dims(t) == [-1, -1])
        params = function.function_type.parameters
        if {_param_name(k) for k in self.inputs} != set(params) or not all(
                p.kind is p.KEYWORD_ONLY and isinstance(p.type_constraint, tf.TensorSpec)
                for p in params.values()):
            raise ValueError(f"signature {name!r} does not take one tensor per input "
                             f"({function.function_type}): re-export it with serving.export")
        # The function's flat inputs are its keyword-only tensors sorted by parameter name,
        # then the captured variables and tables (checked above). Calling `_call_flat`, where
        # the public keyword call ends up once it has bound the arguments, skips that binding
        # on every request (a quarter of a millisecond on 2 cores).
        self._flat_order = sorted(self.inputs, key=_param_name)
        self._function = function
        self._captured = list(function.captured_inputs)

    def parse_inputs(self, inputs: Any, max_elements: int | None = None,
                     max_width: int | None = None,
                     max_items: int | None = None,
                     max_rows: int | None = None) -> dict[str, np.ndarray]:
        """Checks a request's inputs against the signature and decodes them.

        Args:
          inputs: the request's `map<string, TensorProto>`.
          max_elements: the most elements one input may have (None: no limit); a larger
            shape is RESOURCE_EXHAUSTED before anything is allocated.
          max_width, max_items: the widest an item-id input (a string tensor of rank 2:
            `session_items`, `history_items`, `items`) may be, and the most item slots
            (rows × width) it may hold (None: no limit): the model's work grows with
            them, padding included, so a wider or larger one is RESOURCE_EXHAUSTED,
            read from the shape before anything is decoded.
          max_rows: the most rows an input with a batch dimension may have (None: no
            limit); more is RESOURCE_EXHAUSTED, read from the shape.

        Returns:
          name → numpy array, in the signature's (sorted) input order.

        Raises:
          RequestError: INVALID_ARGUMENT naming the missing, extra, mis-typed or
            mis-shaped input, or inputs whose batch sizes differ.
        """
        specs = self.inputs
        if len(inputs) == len(specs) and any(key not in specs for key in inputs):
            alias = min(key for key in inputs if key not in specs)  # (TF Serving's wording)
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor alias not found in signature {self.name!r}: "
                f"{argtypes.shown(alias)}. Inputs expected to be in the set "
                f"{{{','.join(sorted(specs))}}}.")
        if len(inputs) != len(specs):
            sent, expected = set(inputs.keys()), set(specs)
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature {self.name!r}: "
                f"{len(sent)}!={len(expected)} "
                f"len({{{','.join(map(argtypes.shown, sorted(sent)))}}}) != "
                f"len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(map(argtypes.shown, sorted(sent - expected)))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
        arrays, batch = {}, None
        for key, (dtype, dims) in specs.items():
            proto = inputs[key]
            if proto.dtype != dtype:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {key!r} of signature {self.name!r} expects "
                    f"{protos.dtype_name(dtype)} but {protos.dtype_name(proto.dtype)} "
                    "is provided")
            _check_rank(key, self.name, proto, dims)
            if key == self.k_input:
                _check_k(key, proto)
            _check_sequence(key, self.name, proto, max_width, max_items)
            if max_rows is not None and key in self.batched_inputs:
                _check_rows(key, self.name, proto, max_rows)
            try:
                arr = protos.from_proto(proto, max_elements)
            except protos.TensorTooLarge as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"input {key!r}: {e}") from None
            except ValueError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input {key!r}: {e}") from None
            if dims is not None and (arr.ndim != len(dims) or any(
                    d >= 0 and d != s for d, s in zip(dims, arr.shape))):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {key!r} of signature {self.name!r} has shape "
                    f"{list(arr.shape)} but the signature expects {_fmt_shape(dims)}")
            if key in self.batched_inputs:
                if batch is not None and arr.shape[0] != batch[1]:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"inputs {batch[0]!r} and {key!r} have different batch sizes "
                        f"({batch[1]} and {arr.shape[0]}): send one row per user in each")
                batch = (key, arr.shape[0])
            arrays[key] = arr
        return arrays

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the signature in process on inputs from `parse_inputs`.

        Raises:
          RequestError: INVALID_ARGUMENT when the graph rejects the values (its message).
        """
        try:
            flat = [tf.constant(arrays[key]) for key in self._flat_order]
            out = self._function._call_flat(flat, self._captured)  # noqa: SLF001 - see __init__
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               graph_error_line(getattr(e, "message", None) or str(e))) from None
        except tf.errors.OpError as e:  # TF Serving answers the runtime's own code
            raise RequestError(_GRPC_CODES.get(e.error_code, grpc.StatusCode.INTERNAL),
                               graph_error_line(e.message)) from None
        return {key: value.numpy() for key, value in out.items()}


MAX_SEQUENCE_WIDTH = cli.MAX_SEQUENCE_WIDTH
MAX_SEQUENCE_ITEMS = cli.MAX_SEQUENCE_ITEMS
# The longest error message a reply carries, in UTF-8 bytes (it echoes names from the
# request; gRPC sends it percent-encoded, up to 3 characters a byte, in a trailer that
# clients refuse past 8 KB: 1,024 emoji, counted as characters, lost the status's code).
MAX_ERROR_BYTES = 1024


def _cut_message(message: str) -> str:
    """`message`, cut to MAX_ERROR_BYTES of UTF-8 with a mark where it was cut."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_ERROR_BYTES:
        return message
    return data[:MAX_ERROR_BYTES - 12].decode("utf-8", "ignore") + " ... (cut)"


def _check_sequence(key: str, signature: str, proto: Any, max_width: int | None,
                    max_items: int | None) -> None:
    """RESOURCE_EXHAUSTED for an item-id input (string, rank 2) wider than `max_width` or
    of more item slots than `max_items`, from its shape alone (a few bytes of a request
    can name millions of "" ids, each a position the model runs over)."""
    dims = proto.tensor_shape.dim
    if proto.dtype != tf.string.as_datatype_enum or len(dims) != 2 \
            or proto.tensor_shape.unknown_rank:
        return
    rows, width = int(dims[0].size), int(dims[1].size)
    if max_width is not None and width > max_width:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"input {key!r} of signature {signature!r} is {width} items wide, more than "
            f"this server's --max-sequence-width {max_width}: send a user's newest items")
    if max_items is not None and rows > 0 and width > 0 and rows * width > max_items:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"input {key!r} of signature {signature!r} holds {rows} x {width} item slots, "
            f"more than this server's --max-sequence-items {max_items}: send fewer rows "
            "per request")


def _check_rank(key: str, signature: str, proto: Any, dims: list[int] | None) -> None:
    """INVALID_ARGUMENT for an input whose shape (as the request states it) has another rank
    or fixed dimension than the signature's, before it is decoded (a 52-byte request of
    shape [1, 1, 16777216] made 128 MB of "" ids before the shape was looked at)."""
    shape = proto.tensor_shape
    if dims is None or shape.unknown_rank:
        return
    sent = [int(d.size) for d in shape.dim]
    if len(sent) != len(dims) or any(d >= 0 and d != n for d, n in zip(dims, sent)):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {key!r} of signature {signature!r} has shape {sent} but the signature "
            f"expects {_fmt_shape(dims)}")


def _check_k(key: str, proto: Any) -> None:
    """INVALID_ARGUMENT for a top-k signature's `k` that is neither a scalar nor one value per
    row, from its shape before it is decoded: its signature's shape is unknown (either is
    allowed), so a [4096, 4096] k of a 1 KB request was decoded and reached the graph's
    check (0.3 s of CPU and 200 MB) before it was refused with the same words."""
    shape = proto.tensor_shape
    if not shape.unknown_rank and len(shape.dim) > 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{key} must be a scalar or one value per row of user_state ([B]), "
                           f"got shape {[int(d.size) for d in shape.dim]}")


def _check_rows(key: str, signature: str, proto: Any, max_rows: int) -> None:
    """RESOURCE_EXHAUSTED for a batched input of more rows than `max_rows`, from its shape
    alone (`next_items` scores every row over the whole catalogue)."""
    dims = proto.tensor_shape.dim
    if dims and not proto.tensor_shape.unknown_rank and int(dims[0].size) > max_rows:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"input {key!r} of signature {signature!r} has {int(dims[0].size)} rows, more "
            f"than this server's --max-request-rows {max_rows}: send fewer users per request")


class Servable:
    """One loaded SavedModel version with its signatures as TF Serving reads them."""

    def __init__(self, name: str, version: int, path: str):
        """Loads `path` (the SavedModel loader of TF2; same graph TF Serving runs).

        Raises:
          OSError, ValueError: the folder is not a loadable SavedModel.
        """
        self.name = name
        self.version = version
        self.path = path
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        meta_graph = next(m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags)
        self.signature_defs = dict(meta_graph.signature_def)
        self._loaded = tf.saved_model.load(path, tags=["serve"])
        self._signatures = {k: Signature(k, self.signature_defs[k], self._loaded.signatures[k])
                            for k in self.signature_defs if k != INIT_OP_SIGNATURE}
        self._available = ", ".join(sorted(self._signatures))

    def signature(self, name: str) -> Signature:
        """The signature called `name` ('' = serving_default).

        Raises:
          RequestError: FAILED_PRECONDITION for an unknown signature (as TF Serving).
        """
        name = name or DEFAULT_SIGNATURE
        try:
            return self._signatures[name]
        except KeyError:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{argtypes.shown(name)}" not found. '
                               f"Available: {self._available}") from None

    def warm_up(self, batching: bool = False) -> int:
        """Runs the export's `assets.extra/tf_serving_warmup_requests`; returns the count.

        With `batching` each request must pass the batching session's checks, as TF
        Serving runs warm-up through it (a scalar input fails the load)."""
        path = os.path.join(self.path, export.ASSETS_EXTRA, export.WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        n = 0
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            sig = self.signature(entry.predict_log.request.model_spec.signature_name)
            arrays = sig.parse_inputs(entry.predict_log.request.inputs)
            if batching:
                try:
                    Batcher.batch_rows(arrays)
                except RequestError as e:  # (an export's own requests: not the caller's)
                    raise RequestError(e.code, f"{e} in the export's warm-up requests: an "
                                       "export made before 2026-12-02 takes a scalar k, which "
                                       "batching refuses; export the run again") from None
            sig.run(arrays)
            n += 1
        return n


class _Task:
    __slots__ = ("sig", "key", "arrays", "rows", "done", "result", "error", "alive")

    def __init__(self, sig: Signature, key: tuple, arrays: dict[str, np.ndarray], rows: int,
                 alive: Callable[[], bool] | None = None):
        self.sig, self.key, self.arrays, self.rows = sig, key, arrays, rows
        self.alive = alive  # whether its caller still waits (None: always)
        self.done = False
        self.result: dict[str, np.ndarray] | None = None
        self.error: Exception | None = None


def _pad_strings(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenates [rows, T_i] string arrays, padding each to the longest T with ""."""
    width = max(a.shape[1] for a in arrays)
    out = np.full([sum(a.shape[0] for a in arrays), width], b"", dtype=object)
    row = 0
    for a in arrays:
        out[row:row + a.shape[0], :a.shape[1]] = a
        row += a.shape[0]
    return out


# A request joins a batch only while padding its item-id inputs to the widest adds at
# most this many slots, or this share of the requests' own slots if more (Batcher._joined).
PADDING_FREE = 4096
PADDING_ALLOWED = 0.25


class Batcher:
    """Merges concurrent requests to the same version and signature into one model call.

    The request threads run the batches themselves (leader/follower): a thread that
    queues a request becomes the runner when fewer than `num_threads` batches are
    running, so a lone request runs at once on its own thread with no hand-off.

    As in TF Serving's batching session, every input of a request needs the batch
    dimension, the same number of rows in each (a scalar input such as a scalar `k` is
    INVALID_ARGUMENT: send one value per row), and all of them are concatenated. A batch
    takes every waiting request with the same key (version, signature, non-batch shapes)
    up to `max_batch_size` rows and, padded, `max_items` item slots per input, but one
    whose width would pad the batch well beyond its own items (`_joined`); a request of
    more rows is INVALID_ARGUMENT, as TF Serving refuses it without
    `enable_large_batch_splitting`. String inputs of rank 2 (item ids) join whatever their
    length: they are padded at the end with "" (the serving pad id), which the signatures
    ignore (TF Serving pads only with `pad_variable_length_inputs: true`, and with the
    request's first value: the client's fixed widths put "" first). With `timeout_s` > 0
    a batch waits up to that long while it has fewer rows than were in the server at once
    (queued or running, same key) since the previous batch formed: a lone client never
    waits, and N steady clients are served N at a time instead of in two alternating
    halves. A failing batch is rerun request by request so one bad request fails alone.
    """

    def __init__(self, max_batch_size: int, timeout_s: float, num_threads: int = 1,
                 max_items: int | None = None):
        self._max_rows = max_batch_size
        self._max_items = max_items
        self._timeout = timeout_s
        self._num_threads = num_threads
        self._running = 0
        self._queue: collections.deque[_Task] = collections.deque()
        self._in_server: collections.Counter[tuple] = collections.Counter()  # rows per key
        # Per signature object, dropped with it when its version is unloaded: peak rows per key.
        self._peak: weakref.WeakKeyDictionary[Signature, dict[tuple, int]] = (
            weakref.WeakKeyDictionary())
        self._cv = threading.Condition()
        self._stopped = False

    @staticmethod
    def batch_rows(arrays: dict[str, np.ndarray]) -> int:
        """The rows of a request, checked as TF Serving's batching session checks them.

        Raises:
          RequestError: INVALID_ARGUMENT for an input without the batch dimension (a scalar)
            or with another number of rows than the others.
        """
        rows = None
        for k, arr in arrays.items():
            if arr.ndim == 0:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Batching session Run() input tensors must have at least one dimension "
                    f"(input {k!r}: with batching, send one value per row)")
            if rows is not None and arr.shape[0] != rows:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Batching Run() input tensors must have equal 0th-dimension size "
                    f"(input {k!r} has {arr.shape[0]} rows, the others {rows})")
            rows = arr.shape[0]
        return rows or 0

    @staticmethod
    def _padded(arr: np.ndarray) -> bool:
        return arr.dtype == object and arr.ndim == 2

    def submit(self, sig: Signature, arrays: dict[str, np.ndarray],
               alive: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
        """Queues one request (inputs from `Signature.parse_inputs`); returns its result rows.
        `alive`: whether its caller still waits for it (a gRPC context's `is_active`); a
        request whose caller has gone (its deadline passed, or cancelled) while it was
        queued is dropped, not run.

        Raises:
          RequestError: the server is stopping, or the request's own error.
        """
        rows = self.batch_rows(arrays)
        if rows > self._max_rows:  # as TF Serving's batch scheduler (no large batch splitting)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Task size {rows} is larger than maximum input batch size "
                               f"{self._max_rows} (--max-batch-size): send fewer rows per request")
        key = (id(sig), tuple((k, arr.dtype.str, arr.ndim if self._padded(arr) else arr.shape[1:])
                              for k, arr in arrays.items()))  # sorted by name
        task = _Task(sig, key, arrays, rows, alive)
        with self._cv:
            if self._stopped:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self._queue.append(task)
            self._in_server[key] += rows
            peaks = self._peak.setdefault(sig, {})
            peaks[key] = max(peaks.get(key, 0), self._in_server[key])
            self._cv.notify_all()
            while not task.done:
                if self._queue and self._running < self._num_threads:
                    self._running += 1
                    batch = self._form_batch()
                    self._cv.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cv.acquire()
                        self._running -= 1
                        self._cv.notify_all()
                else:
                    self._cv.wait()
            self._in_server[key] -= rows
            if not self._in_server[key]:
                del self._in_server[key]
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self) -> None:
        """Refuses new requests; those already queued still run."""
        with self._cv:
            self._stopped = True

    @classmethod
    def _slots(cls, task: _Task) -> dict[str, tuple[int, int]]:
        """(rows, width) of each of a request's item-id inputs (those padded when merged)."""
        return {k: arr.shape for k, arr in task.arrays.items() if cls._padded(arr)}

    def _joined(self, slots: dict[str, tuple[int, int, int]],
                task: _Task) -> dict[str, tuple[int, int, int]] | None:
        """The `slots` of a batch whose item-id inputs have `slots` (name -> (rows, widest,
        own item slots)) once `task` joins it, or None where it may not: padded to the
        widest, the batch holds at most
        `max_items` slots per input and padding adds at most PADDING_ALLOWED of its own
        slots beyond PADDING_FREE (a request far wider than the others runs apart
        instead of making each of them as wide: one 300,000-item session among 3-item
        ones made a batch of millions of padding positions)."""
        joined = {}
        for k, (rows, width) in self._slots(task).items():
            total_rows, widest, own = slots[k]
            total_rows, widest, own = total_rows + rows, max(widest, width), own + rows * width
            padded = total_rows * widest
            if (self._max_items is not None and padded > self._max_items) or \
                    padded - own > PADDING_FREE + own * PADDING_ALLOWED:
                return None
            joined[k] = (total_rows, widest, own)
        return joined

    def _drop_if_gone(self, task: _Task) -> bool:
        """Whether a queued task's caller has gone; if so it is taken off the queue and
        ended with an error no one reads (called holding the lock)."""
        if task.alive is None or task.alive():
            return False
        self._queue.remove(task)
        task.error = RequestError(grpc.StatusCode.CANCELLED, "the request's deadline passed "
                                  "or it was cancelled while it waited in the batching queue")
        task.done = True
        self._cv.notify_all()
        return True

    def _take(self, key: tuple, rows: int, slots: dict[str, tuple[int, int, int]]) -> list[_Task]:
        taken = []
        for task in list(self._queue):
            if task.key != key or rows + task.rows > self._max_rows or self._drop_if_gone(task):
                continue
            joined = self._joined(slots, task)
            if joined is None:
                continue
            self._queue.remove(task)
            taken.append(task)
            rows += task.rows
            slots.update(joined)
        return taken

    def _form_batch(self) -> list[_Task]:
        """Pops the oldest request and its companions (called holding the lock); none
        when every queued one's caller has gone."""
        while self._queue and self._drop_if_gone(self._queue[0]):
            pass
        if not self._queue:
            return []
        first = self._queue.popleft()
        key, batch, rows = first.key, [first], first.rows
        slots = {k: (r, w, r * w) for k, (r, w) in self._slots(first).items()}
        peaks = self._peak.setdefault(first.sig, {})
        expected = min(self._max_rows, peaks.get(key, 1))
        deadline = time.monotonic() + self._timeout
        while True:
            more = self._take(key, rows, slots)
            batch += more
            rows += sum(t.rows for t in more)
            left = deadline - time.monotonic()
            if rows >= expected or left <= 0:
                break
            self._cv.wait(left)
        peaks[key] = self._in_server[key]
        return batch

    @staticmethod
    def _run_one(task: _Task) -> None:
        try:
            task.result = task.sig.run(task.arrays)
        except Exception as e:  # noqa: BLE001 - handed to the request's own thread
            task.error = e
        task.done = True

    def _run(self, batch: list[_Task]) -> None:
        if not batch:
            return
        first = batch[0]
        if len(batch) == 1:
            self._run_one(first)
            return
        sig = first.sig
        try:
            merged = {}
            for k, value in first.arrays.items():
                parts = [t.arrays[k] for t in batch]
                if self._padded(value):
                    merged[k] = _pad_strings(parts)
                else:
                    merged[k] = np.concatenate(parts)
            out = sig.run(merged)
        except Exception:  # noqa: BLE001 - rerun alone so only the bad request fails
            for t in batch:
                self._run_one(t)
            return
        offsets = np.cumsum([0] + [t.rows for t in batch])
        for t, lo, hi in zip(batch, offsets[:-1], offsets[1:]):
            t.result = {k: (v[lo:hi] if k in sig.batched_outputs else v) for k, v in out.items()}
            if sig.k_input is not None:
                # every row was scored at the batch's largest k: a request gets its own
                # columns, as alone (top_k's order is stable, so they are the same ones; TF
                # Serving's batching gives each the largest, and its width then depends on
                # the requests it met: a reply over the message cap failed a request that
                # succeeds alone)
                ks = t.arrays[sig.k_input]
                own = max(int(ks.max()), 0) if ks.size else 0
                for k in sig.k_outputs:
                    t.result[k] = t.result[k][:, :own]
            t.done = True


def host_port(host: str, port: int) -> str:
    """gRPC's HOST:PORT, an IPv6 literal in brackets (`::1` → `[::1]:8500`; `[::1]` and
    names as given): unbracketed, gRPC reads the address's last colon as the port's."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _bind_advice(host: str, port: int) -> str | None:
    """What to change when gRPC cannot bind host:port, from binding it here: --port when
    that port is in use (or privileged), --host when no socket can be bound to that host
    at all (not an address of this machine, or not one at all); None when it can be bound
    (gRPC refused it for a reason of its own, said in its error)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"--host {host} does not resolve: pass an address of this machine (0.0.0.0 for all)"
    bound = False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
            bound = True
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} is in use: pick a free --port (0: any free one)"
            if e.errno == errno.EACCES:
                return (f"port {port} needs privileges this process lacks: pick a --port "
                        "from 1024")
            continue
    if bound:
        return None
    return f"--host {host} is not an address of this machine: pass one of its own (0.0.0.0 for all)"


def version_folders(base_path: str) -> dict[int, str]:
    """{version: folder name} of the integer-named folders that hold a SavedModel (`007` is
    version 7, as TF Serving reads it; `7` wins over `007`; a number beyond int64 is not a
    version, as TF Serving skips it)."""
    try:
        names = sorted(os.listdir(base_path), key=lambda n: (len(n), n), reverse=True)
    except OSError:
        return {}
    return {v: n for n in names if (v := export.version_number(n)) is not None
            and _holds_saved_model(os.path.join(base_path, n))}


def _holds_saved_model(folder: str) -> bool:
    """Whether a version folder holds a SavedModel; one this process may not read counts (its
    load fails and says why, the status END with the error, as TF Serving reports it: it
    was ignored without a word, another user's export made with umask 077)."""
    try:
        os.stat(os.path.join(folder, "saved_model.pb"))
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def list_versions(base_path: str) -> list[int]:
    """Integer version folders that hold a complete SavedModel, ascending."""
    return sorted(version_folders(base_path))


def folder_state(path: str) -> tuple:
    """(relative path, inode, size, mtime) of every file under `path`, sorted: changes when a file
    is added, removed or rewritten (including the folder being replaced by a rename)."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


class _Failure(NamedTuple):
    """A version's failed load: the error, its canonical code, the folder's files then, how
    many retries of the same files had failed before it, and when (the manager's clock)."""
    error: str
    code: int
    state: tuple
    retries: int
    at: float


def load_error_code(error: BaseException) -> int:
    """The canonical error code (google.rpc.Code) of a failed load, as TF Serving reports
    it: a TensorFlow error's own; for an OSError NOT_FOUND (5) or PERMISSION_DENIED (7)
    where its errno says so; else UNKNOWN (2)."""
    if isinstance(error, tf.errors.OpError):
        return int(error.error_code)
    if isinstance(error, OSError):
        if error.errno == errno.ENOENT:
            return 5
        if error.errno in (errno.EACCES, errno.EPERM):
            return 7
    return 2


class ModelManager:
    """The versions of one model under TF Serving's `latest {num_versions: N}` policy.

    Availability first: a new version is loaded and warmed up while the old ones keep
    serving; old versions are unloaded only once a wanted version is available. A version
    that fails to load is reported in the status (END with the error and its code) and
    loaded again at once when its folder's files change (a copy that was still under way,
    a fixed export); an unchanged folder is retried `max_load_retries` times,
    `load_retry_interval_s` apart (TF Serving's --max_num_load_retries and
    --load_retry_interval_micros: a permission fixed, memory freed), then left until its
    files change. A loaded version whose files change (copied in
    place over the old files, or a folder replaced) is loaded again and replaces the one
    served once it has loaded; a load during which the files changed does not count.
    """

    def __init__(self, name: str, base_path: str, num_versions: int = 1,
                 on_ready: Callable[[int], None] | None = None, batching: bool = False,
                 max_load_retries: int = MAX_LOAD_RETRIES,
                 load_retry_interval_s: float = LOAD_RETRY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.max_load_retries = max_load_retries
        self.load_retry_interval_s = load_retry_interval_s
        self._clock = clock
        self.batching = batching
        self.base_path = base_path
        self.num_versions = num_versions
        self._servables: dict[int, Servable] = {}
        self._loaded_state: dict[int, tuple] = {}  # version: folder_state when it loaded
        self._failed: dict[int, _Failure] = {}
        self._folders: dict[int, str] = {}  # version: folder name, from the last scan
        self._ended: set[int] = set()  # versions unloaded (END in the status, as TF Serving)
        self._gone_said: set[int] = set()  # served versions whose folder is gone, logged once
        self._loading: set[int] = set()  # versions being loaded (LOADING, as TF Serving)
        self._lock = threading.Lock()
        self._on_ready = on_ready

    def _path(self, version: int) -> str:
        return os.path.join(self.base_path, self._folders.get(version, str(version)))

    def _load(self, version: int, retries: int = 0) -> None:
        """Loads a version; `retries`: how many loads of these same files failed before."""
        path = self._path(version)
        before = folder_state(path)
        with self._lock:
            self._loading.add(version)
        try:
            servable = Servable(self.name, version, path)
            warmed = servable.warm_up(self.batching)
            if folder_state(path) != before:
                raise OSError(f"the files of {path} changed while it loaded (a copy under way?); "
                              "it loads again once they stop changing")
        except Exception as e:  # noqa: BLE001 - a bad export must not stop serving
            error = f"{type(e).__name__}: {graph_error_line(str(e))}"
            again = (f"; loading it again in {self.load_retry_interval_s:g} s (retry "
                     f"{retries + 1} of {self.max_load_retries}) or when its files change"
                     if retries < self.max_load_retries else
                     "; loading it again when its files change" + (
                         f" ({retries} retries failed)" if retries else ""))
            log.error("version %d of %s failed to load: %s%s", version, self.name, error, again)
            with self._lock:
                # the state before the load: files that changed during it are retried
                self._failed[version] = _Failure(error, load_error_code(e), before, retries,
                                                 self._clock())
                self._loading.discard(version)
            return
        log.info("loaded %s version %d (%d warm-up requests)", self.name, version, warmed)
        with self._lock:
            self._loading.discard(version)
            self._servables[version] = servable
            self._loaded_state[version] = before
            self._failed.pop(version, None)
            self._ended.discard(version)

    def _should_load(self, version: int) -> int | None:
        """None: leave the version as it is; else load it, the count of failed retries of
        the same files before (0 for new or changed files)."""
        state = folder_state(self._path(version))
        with self._lock:
            failed = self._failed.get(version)
            loaded = self._loaded_state.get(version) if version in self._servables else None
        if failed is not None and state == failed.state:
            if (failed.retries < self.max_load_retries
                    and self._clock() - failed.at >= self.load_retry_interval_s):
                log.info("loading version %d of %s again (retry %d of %d)", version,
                         self.name, failed.retries + 1, self.max_load_retries)
                return failed.retries + 1
            return None  # retried later, or once its files change
        if loaded is not None:
            if state == loaded:
                return None
            log.info("version %d of %s changed on disk since it loaded: loading it again",
                     version, self.name)
        elif failed is not None:
            log.info("version %d of %s changed since it failed to load: loading it again",
                     version, self.name)
        return 0

    def poll(self) -> None:
        """One scan of the base path: load wanted versions (newest first), unload the rest.

        Calls `on_ready(version)` once the scan has made a new version the newest served.
        """
        with self._lock:
            newest_before = max(self._servables, default=None)
        self._folders = version_folders(self.base_path)
        with self._lock:  # a version folder that is gone is no longer reported as failed
            for v in [v for v in self._failed if v not in self._folders]:
                del self._failed[v]
        wanted = sorted(self._folders)[-self.num_versions:]
        for version in reversed(wanted):
            retries = self._should_load(version)
            if retries is not None:
                self._load(version, retries)
        with self._lock:
            if any(v in self._servables for v in wanted):
                for v in [v for v in self._servables if v not in wanted]:
                    del self._servables[v]  # requests already holding it finish on it
                    self._loaded_state.pop(v, None)
                    self._ended.add(v)
                    log.info("unloaded %s version %d", self.name, v)
            else:  # keep serving what we have until a wanted version is available
                gone = sorted(v for v in self._servables
                              if v not in self._folders and v not in self._gone_said)
                if gone:  # (said once: a served version's folder removed left no word)
                    self._gone_said.update(gone)
                    log.warning("%s version(s) %s: folder gone from %s; still served from "
                                "memory until a version there loads", self.name,
                                ", ".join(map(str, gone)), self.base_path)
            newest = max(self._servables, default=None)
        if newest is not None and newest != newest_before and self._on_ready:
            self._on_ready(newest)

    def get(self, version: int | None) -> Servable:
        """The servable for a version (None = latest loaded).

        Raises:
          RequestError: NOT_FOUND when that version is not loaded; UNAVAILABLE while no
            version has loaded yet (TF Serving opens its port only once the first one has:
            a client retries UNAVAILABLE, where NOT_FOUND reads as a wrong model name).
        """
        with self._lock:
            if version is None and self._servables:
                return self._servables[max(self._servables)]
            if version is not None and version in self._servables:
                return self._servables[version]
            starting = not self._servables
            loading, failed = sorted(self._loading), sorted(self._failed)
        if starting:
            why = (f"loading version {loading[-1]}" if loading else
                   f"version {failed[-1]} failed to load: GetModelStatus says why" if failed
                   else f"waiting for one under {self.base_path}")
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"model {self.name}: no version is loaded yet ({why}); try again")
        what = f"Latest({self.name})" if version is None else f"Specific({self.name}, {version})"
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}")

    def statuses(self, version: int | None) -> list[get_model_status_pb2.ModelVersionStatus]:
        """ModelVersionStatus entries: AVAILABLE; LOADING while a version that is not served
        loads (its first load, or again after a failure: TF Serving's START/LOADING, where
        NOT_FOUND would read as a wrong model name); END with the load error; END (OK) for a
        version unloaded since it served, which TF Serving goes on listing too.

        Raises:
          RequestError: NOT_FOUND when nothing matches.
        """
        state = get_model_status_pb2.ModelVersionStatus.State
        with self._lock:
            entries = [(v, state.AVAILABLE, None) for v in self._servables]
            entries += [(v, state.LOADING, None) for v in self._loading
                        if v not in self._servables]
            entries += [(v, state.END, f) for v, f in self._failed.items()
                        if v not in self._servables and v not in self._loading]
            entries += [(v, state.END, None) for v in self._ended
                        if v not in self._servables and v not in self._failed
                        and v not in self._loading]
        # newest first, as TF Serving's version map (`std::greater<Version>`) lists them
        entries = sorted((e for e in entries if version is None or e[0] == version),
                         reverse=True)
        if not entries:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find any versions of model {self.name}"
                               if version is None else
                               f"Could not find version {version} of model {self.name}")
        out = []
        for v, s, failure in entries:
            status = status_pb2.StatusProto(error_code=failure.code if failure else 0,
                                            error_message=failure.error if failure else "")
            out.append(get_model_status_pb2.ModelVersionStatus(version=v, state=s, status=status))
        return out


def _version_of(spec: model_pb2.ModelSpec) -> int | None:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return int(spec.version.value)
    if choice == "version_label":
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Unrecognized servable version label: "
                           f"{argtypes.shown(spec.version_label)} "
                           "(this server has no labels; pin a version number)")
    return None


class _Handlers(prediction_service_pb2_grpc.PredictionServiceServicer,
                model_service_pb2_grpc.ModelServiceServicer):
    """gRPC methods: thin wrappers that map RequestError to status codes."""

    def __init__(self, manager: ModelManager, batcher: Batcher | None,
                 max_elements: int | None = None, max_width: int | None = None,
                 max_items: int | None = None, max_rows: int | None = None):
        self._manager = manager
        self._batcher = batcher
        self._max_elements = max_elements
        self._max_width = max_width
        self._max_items = max_items
        self._max_rows = max_rows

    @staticmethod
    def _model_spec(request) -> model_pb2.ModelSpec:
        """The request's ModelSpec; INVALID_ARGUMENT "Missing ModelSpec" without one, the
        first check of TF Serving's Predict, GetModelMetadata and GetModelStatus."""
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        return request.model_spec

    def _servable(self, spec: model_pb2.ModelSpec) -> Servable:
        # TF Serving's order (ServableRequestFromModelSpec): the name given, a label resolved
        if not spec.name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        if spec.WhichOneof("version_choice") == "version_label":
            _version_of(spec)  # (INVALID_ARGUMENT: this server has no labels)
        if spec.name != self._manager.name:
            name = argtypes.shown(spec.name)  # (a line break or NUL would break the line)
            what = (f"Latest({name})" if spec.WhichOneof("version_choice") is None
                    else f"Specific({name}, {spec.version.value})")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}")
        return self._manager.get(_version_of(spec))

    @staticmethod
    def _guard(context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RequestError as e:  # (a request's names echoed whole could exceed the
            # trailer's size limit: the client would get an unrelated transport error)
            context.abort(e.code, _cut_message(e.message))
        except Exception as e:  # noqa: BLE001 - a bug answers INTERNAL, the server lives on
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}".split("\n")[0])

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        def predict():
            servable = self._servable(self._model_spec(request))
            sig = servable.signature(request.model_spec.signature_name)
            for i, key in enumerate(request.output_filter):
                if key not in sig.outputs:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "output tensor alias not found in signature: "
                                       f"{argtypes.shown(key)} "
                                       f"(outputs: {', '.join(sorted(sig.outputs))})")
                if key in request.output_filter[:i]:  # as TF Serving's predict_util
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"duplicate output tensor alias: {argtypes.shown(key)}")
            arrays = sig.parse_inputs(request.inputs, self._max_elements, self._max_width,
                                      self._max_items, self._max_rows)
            if not context.is_active():  # (its deadline passed, or it was cancelled, while
                # its inputs were read: the model does not run for no one)
                raise RequestError(grpc.StatusCode.CANCELLED, "the request's deadline passed "
                                   "or it was cancelled before the model ran")
            if self._batcher is not None:
                out = self._batcher.submit(sig, arrays, context.is_active)
            else:
                out = sig.run(arrays)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = sig.name
            for key in request.output_filter or out:  # (numbers as TF Serving's float_val..)
                protos.fill_proto(response.outputs[key], out[key], as_fields=True)
            return response
        return self._guard(context, predict)

    def GetModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
        def metadata():
            spec = self._model_spec(request)
            if not request.metadata_field:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != SIGNATURE_DEF_FIELD:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Metadata field {field} is not supported")
            servable = self._servable(spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, value in servable.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(value)
            response.metadata[SIGNATURE_DEF_FIELD].Pack(sig_map)
            return response
        return self._guard(context, metadata)

    def GetModelStatus(self, request, context):  # noqa: N802 - gRPC method name
        def status():
            spec = self._model_spec(request)
            if spec.name != self._manager.name:
                raise RequestError(grpc.StatusCode.NOT_FOUND, "Could not find any versions of "
                                   f"model {argtypes.shown(spec.name)}")
            response = get_model_status_pb2.GetModelStatusResponse()
            # (TF Serving reads only `version` here: a `version_label` lists every version)
            version = spec.version.value if spec.WhichOneof("version_choice") == "version" \
                else None
            response.model_version_status.extend(self._manager.statuses(version))
            return response
        return self._guard(context, status)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802 - gRPC method name
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this local server serves one model; "
                      "restart it with another --model-base-path")

    def _signature_def(self, spec: model_pb2.ModelSpec, missing: str):
        """(signature name, SignatureDef) of a Classify, Regress or MultiInference call:
        NOT_FOUND for another model or version, INVALID_ARGUMENT `missing` + the name for a
        signature the model lacks (TF Serving's checks, in its order)."""
        servable = self._servable(spec)
        name = spec.signature_name or DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(name) if name != INIT_OP_SIGNATURE else None
        if signature is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, missing + name)
        return name, signature

    @staticmethod
    def _not_inference(name: str, signature, kind: str) -> RequestError:
        """TF Serving's answer to Classify or Regress on a Predict signature: its default
        check wants one input tensor of serialized Examples."""
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"Expected one input Tensor. (signature {name!r} is a Predict "
                            f"signature ({signature.method_name}) with "
                            f"{len(signature.inputs)} inputs, not a {kind} one: call Predict)")

    def _refuse(self, request, context, kind: str):
        def refuse():
            name, signature = self._signature_def(self._model_spec(request),
                                                  "No signature was found with the name: ")
            raise self._not_inference(name, signature, kind)
        return self._guard(context, refuse)

    def Classify(self, request, context):  # noqa: N802 - gRPC method name
        return self._refuse(request, context, "classification")

    def Regress(self, request, context):  # noqa: N802 - gRPC method name
        return self._refuse(request, context, "regression")

    def MultiInference(self, request, context):  # noqa: N802 - gRPC method name
        def refuse():
            if not request.tasks:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "Expected at least one task")
            for task in request.tasks:
                name, signature = self._signature_def(
                    self._model_spec(task), "Requested signature not found in model graph: ")
                if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                    raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                                       f"Unsupported signature method_name: {task.method_name}")
                raise self._not_inference(name, signature, "classification"
                                          if task.method_name == CLASSIFY_METHOD else "regression")
        return self._guard(context, refuse)


class _UndecodableRequests(logging.Filter):
    """gRPC logs every request body it cannot parse as its method's message (random bytes,
    a truncated or corrupt message) with a 6-line traceback at ERROR, and answers INTERNAL:
    a client's error, not the server's. Said instead in one line, at most once a minute,
    with how many came since (2,000 junk requests wrote 12,000 log lines)."""

    MESSAGE = "Exception deserializing message!"
    EVERY_S = 60.0

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._count = 0
        self._said = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._said < self.EVERY_S:
                return False
            n, self._count, self._said = self._count, 0, now
        record.msg = (f"{n} request{'s' * (n != 1)} that {'are' if n != 1 else 'is'} not a "
                      "valid protobuf message of the method called (answered INTERNAL "
                      "\"Exception deserializing request!\", as gRPC does; said at most once a "
                      "minute)")
        record.args, record.exc_info, record.exc_text = (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    def flush(self) -> None:
        """Says the requests counted since the last line (at shutdown: they were not said)."""
        with self._lock:
            n, self._count = self._count, 0
        if n:
            log.warning("%d more request%s that %s not a valid protobuf message of the method "
                        "called since the last such line", n, "s" * (n != 1),
                        "are" if n != 1 else "is")


def _quiet_undecodable_requests() -> None:
    """Installs `_UndecodableRequests` on gRPC's logger, once."""
    logger = logging.getLogger("grpc._common")
    if not any(isinstance(f, _UndecodableRequests) for f in logger.filters):
        logger.addFilter(_UndecodableRequests())


class ModelServer:
    """The gRPC server, its version poller and (optionally) its batcher."""

    def __init__(self, model_name: str, model_base_path: str, host: str = "127.0.0.1",
                 port: int = 8500, enable_batching: bool = False, max_batch_size: int = 64,
                 batch_timeout_micros: int = 0, poll_seconds: float = 1.0,
                 max_message_mb: int = 16, num_versions: int = 1, num_batch_threads: int = 1,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 max_sequence_width: int = MAX_SEQUENCE_WIDTH,
                 max_sequence_items: int = MAX_SEQUENCE_ITEMS,
                 max_request_rows: int = cli.MAX_REQUEST_ROWS,
                 grpc_max_threads: int | None = None,
                 max_num_load_retries: int = MAX_LOAD_RETRIES,
                 load_retry_interval_micros: int = int(LOAD_RETRY_INTERVAL_S * 1e6)):
        """Binds the port; call `start()` to load versions and serve.

        `grpc_max_threads` (default `default_grpc_threads()`): calls served at once, as TF
        Serving's --grpc_max_threads; more wait their turn (one whose caller has gone by
        then is not run).

        A version that fails to load is tried again `max_num_load_retries` times,
        `load_retry_interval_micros` apart, as TF Serving does (and at once when its files
        change).

        With `tls_cert` and `tls_key` (PEM files: the server's certificate chain and private
        key) the port speaks TLS, as TF Serving's `--ssl_config_file` makes it.

        Raises:
          ValueError: bad options (missing base path, port in use, non-positive sizes, only
            one of the TLS files, an unreadable TLS file).
        """
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        credentials = None
        if tls_cert is not None:
            try:
                with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
                    key, cert = k.read(), c.read()
            except OSError as e:
                raise ValueError(f"cannot read the TLS files: {e}") from None
            if b"-----BEGIN CERTIFICATE-----" not in cert or b"PRIVATE KEY-----" not in key:
                raise ValueError(f"--tls-cert {tls_cert} must hold a PEM certificate chain and "
                                 f"--tls-key {tls_key} its PEM private key")
            credentials = grpc.ssl_server_credentials([(key, cert)])
        if not os.path.isdir(model_base_path):
            raise ValueError(f"--model-base-path {model_base_path} is not a folder: "
                             "pass the --export-base of serving.export")
        if os.path.exists(os.path.join(model_base_path, "saved_model.pb")):
            raise ValueError(f"--model-base-path {model_base_path} is one version's folder: "
                             "pass the folder that holds the numbered versions (its parent, "
                             "the --export-base of serving.export)")
        if grpc_max_threads is None:
            grpc_max_threads = default_grpc_threads()
        if min(max_batch_size, max_message_mb, num_versions, num_batch_threads,
               max_sequence_width, max_sequence_items, max_request_rows,
               grpc_max_threads) < 1 \
                or poll_seconds <= 0 or batch_timeout_micros < 0 or not 0 <= port <= 65535 \
                or max_message_mb > 2047 or max_num_load_retries < 0 \
                or load_retry_interval_micros < 0:
            raise ValueError("--max-batch-size, --num-batch-threads, --grpc-max-threads, "
                             "--max-message-mb, "
                             "--max-sequence-width, --max-sequence-items, "
                             "--max-request-rows and "
                             "--num-versions must be >= 1, --poll-seconds > 0, "
                             "--batch-timeout-micros, --max-num-load-retries and "
                             "--load-retry-interval-micros >= 0, --port from 0 to 65535 and "
                             "--max-message-mb at most 2047")
        # a port in use or a host not of this machine, found before gRPC's core logs its
        # own failure to stderr (a line of C++ log above the one-line error)
        advice = _bind_advice(host, port)
        if advice:
            raise ValueError(f"cannot bind {host_port(host, port)}: {advice}")
        _quiet_undecodable_requests()
        self.ready = threading.Event()
        self.manager = ModelManager(model_name, model_base_path, num_versions, self._on_ready,
                                    batching=enable_batching,
                                    max_load_retries=max_num_load_retries,
                                    load_retry_interval_s=load_retry_interval_micros / 1e6)
        self.batcher = (Batcher(max_batch_size, batch_timeout_micros / 1e6, num_batch_threads,
                                max_items=max_sequence_items)
                        if enable_batching else None)
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        limit = max_message_mb * 1024 * 1024
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=grpc_max_threads),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        # A tensor of a request within the size cap has at most one element per byte (the
        # *_val forms may ask for more by repeating their last value: refused beyond that).
        # An item-id input also has a width and a number of item slots that bound the
        # model's work (--max-sequence-width, --max-sequence-items), padding included, and
        # every batched input a number of rows (--max-request-rows).
        handlers = _Handlers(self.manager, self.batcher, max_elements=limit,
                             max_width=max_sequence_width, max_items=max_sequence_items,
                             max_rows=max_request_rows)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(handlers, self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(handlers, self._grpc)
        address = host_port(host, port)
        try:
            self.port = (self._grpc.add_insecure_port(address) if credentials is None
                         else self._grpc.add_secure_port(address, credentials))
        except RuntimeError as e:
            advice = _bind_advice(host, port)
            if credentials is not None:
                raise ValueError(f"cannot serve TLS on {address} ({e}): "
                                 + (advice or "check that --tls-key is the private key of "
                                    "--tls-cert")) from None
            raise ValueError(f"cannot bind {address} ({e})"
                             + (f": {advice}" if advice else "")) from None
        if not self.port:
            advice = _bind_advice(host, port)
            raise ValueError(f"cannot bind {address}" + (f": {advice}" if advice else ""))
        self.host = host
        self._poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)

    def _on_ready(self, version: int) -> None:
        if self._stop.is_set():  # (a stop during the first load: no "serving" line after
            return               # "shutting down", which a script waiting for it believed)
        print(f"serving {self.manager.name} version {version} on "
              f"{host_port(self.host, self.port)}", flush=True)
        self.ready.set()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.manager.poll()
            except Exception:  # noqa: BLE001 - keep polling whatever happens on disk
                log.exception("poll failed")
            self._stop.wait(self._poll_seconds)

    def start(self) -> None:
        """Starts serving and polling (the first version loads in the background)."""
        self._grpc.start()
        self._poller.start()

    def stopping(self) -> None:
        """Marks the server as stopping (a signal came): a version that finishes loading
        from now on is not announced as served."""
        self._stop.set()

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting requests, finishes those in flight, stops the threads."""
        self._stop.set()
        self._grpc.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()
        if self._poller.ident is not None:  # (started)
            self._poller.join(timeout=grace)
        for f in logging.getLogger("grpc._common").filters:
            if isinstance(f, _UndecodableRequests):
                f.flush()


def _not_a_base_path(path: str) -> str | None:
    """Why a local folder is plainly not a base path of versions (a training run folder, a
    pipeline's data folder, a SavedModel itself), where waiting for a version to appear would wait forever."""
    if not os.path.isdir(path) or list_versions(path):
        return None
    if (os.path.exists(os.path.join(path, "saved_model.pb"))
            and not os.path.basename(os.path.normpath(path)).isdigit()):  # (said later)
        return ("is a SavedModel itself: a base path holds numbered versions of it (move it "
                f"to {os.path.join(path, '1')}, or export with serving.export)")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(
            os.path.join(path, "config.json")):
        return ("is a model.train run folder: export it first (python -m serving.export "
                f"--model-dir {path} --export-base BASE) and serve BASE")
    if storage.folder_kind(path) == "a pipeline output":
        return ("is a pipeline output (session records): train a model on it (python -m "
                f"model.train --data {path} --model-dir RUN), export the run (python -m "
                "serving.export --model-dir RUN --export-base BASE) and serve BASE")
    return None


def _unlisted(base_path: str) -> str:
    """Why a base path shows no version where that is not simply "none exported yet": it
    does not exist, or this process may not list it (the server waited for a version
    without a word on why, with versions in a folder another user made with umask 077)."""
    try:
        os.listdir(base_path)
    except FileNotFoundError:
        return " (the folder does not exist yet)"
    except OSError as e:
        return f" (this process cannot list it: {e.strerror}; make it readable to this user)"
    return ""


def _utc_log_handler() -> logging.Handler:
    """Log lines to stderr stamped in UTC, ISO 8601 with a Z (the machine's local time,
    unzoned, could not be told from UTC in a log gathered from several machines)."""
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(name)s %(levelname)s %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; serves until SIGTERM or SIGINT, returns the exit status."""
    args = cli.server_args(argv)
    argtypes.survive_closed_output()  # (an ASCII-only stderr: a model name's ü is escaped)
    logging.basicConfig(level=logging.INFO, handlers=[_utc_log_handler()])
    wrong = _not_a_base_path(args.model_base_path)
    if wrong:
        print(f"error: --model-base-path {args.model_base_path} {wrong}", file=sys.stderr)
        return 2
    try:
        server = ModelServer(args.model_name, args.model_base_path, args.host, args.port,
                             args.enable_batching, args.max_batch_size,
                             args.batch_timeout_micros, args.poll_seconds, args.max_message_mb,
                             args.num_versions, args.num_batch_threads, args.tls_cert,
                             args.tls_key, args.max_sequence_width, args.max_sequence_items,
                             args.max_request_rows, args.grpc_max_threads,
                             args.max_num_load_retries, args.load_retry_interval_micros)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    def on_signal(*_):
        stop.set()
        server.stopping()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.start()
    if not list_versions(args.model_base_path):
        # (the port is said now: with --port 0 nothing else would say which one it is)
        log.warning("no version under %s yet%s; waiting for one (listening on %s)",
                    args.model_base_path, _unlisted(args.model_base_path),
                    host_port(server.host, server.port))
    while not stop.wait(1.0):
        pass
    log.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
