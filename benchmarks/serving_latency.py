"""Serving latency and throughput of `next_items` over gRPC (issue 5).

Workload: a HierTCN with the default dims (E = C = 128, state H = 256, random weights) and
a 50,000-item catalogue, exported with serving.export and served by serving.server with
batching on; requests are single users with a 10-item session, k = 20. The published model
by default; `--repeat-head` exports the default model with the repeat head (H = 276 with
its start items), and each request then carries 200 history items (the model's `history_size`)
and 20 start items.

Measures, in one run: the in-process SavedModel call time at batch 1; p50/p99 latency over
gRPC at batch 1 from one client; requests/s with 8 concurrent clients; and
grpc_overhead_ratio = gRPC p50 / in-process p50. The last line is one JSON object.

    python benchmarks/serving_latency.py [--quick] [--repeat-head]
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import serving  # noqa: E402,F401 - sets the Keras mode before TensorFlow is imported
import numpy as np  # noqa: E402

from model import quiet  # noqa: E402
from model.config import HierTCNConfig  # noqa: E402
from pipeline import schema  # noqa: E402

import bench_lib  # noqa: E402 - this folder

# imported by `_import_tensorflow`, once the options are read: a bad option is one line at
# once, not after TensorFlow's start and its notes
grpc = tf = predict_pb2 = prediction_service_pb2_grpc = registry = export = protos = None


def _import_tensorflow() -> None:
    global grpc, tf, predict_pb2, prediction_service_pb2_grpc, registry, export, protos
    quiet.import_tensorflow(keras=True)
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from model import registry
    from serving import export, protos

ITEMS = 50_000
SESSION_LENGTH = 10
K = 20
MAX_HISTORY_ITEMS = 100_000
CLIENTS = 8
BATCH_TIMEOUT_MICROS = 5000  # only waited for while other clients' requests are in flight
NAME = "hiertcn"
READY = re.compile(r"^serving \S+ version \d+ on (\S+)$")


def build_export(base: str, repeat_head: bool) -> tuple[str, schema.Vocabulary]:
    """Exports a randomly initialised HierTCN (default sizes; the repeat head or the
    published model) over a synthetic catalogue."""
    ids = (schema.PAD_TOKEN, schema.UNKNOWN_TOKEN) + tuple(f"item{i}" for i in range(ITEMS))
    vocab = schema.Vocabulary(ids=ids, counts=np.zeros(len(ids), np.int64))
    tf.keras.utils.set_random_seed(0)
    model = registry.build_model("hiertcn", HierTCNConfig(repeat_head=repeat_head), vocab.size)
    return export.export_model(model, vocab, base), vocab


def make_inputs(vocab: schema.Vocabulary, n: int, state_size: int, history: int,
                start_items: int = 0) -> list[dict[str, np.ndarray]]:
    """n single-user requests: random states (their last `start_items` numbers random item
    indices, the head's start items), 10-item sessions of random items and `history`
    random history items (an empty one when 0)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        items = rng.integers(schema.NUM_RESERVED, vocab.size, size=SESSION_LENGTH)
        past = rng.integers(schema.NUM_RESERVED, vocab.size, size=history)
        state = rng.normal(size=[1, state_size]).astype(np.float32)
        if start_items:
            state[0, -start_items:] = rng.integers(schema.NUM_RESERVED, vocab.size, start_items)
        out.append({
            "user_state": state,
            "session_items": np.array([[vocab.ids[i] for i in items]], dtype=object),
            "history_items": np.array([[vocab.ids[i] for i in past] or [""]], dtype=object),
            "k": np.int32([K])})  # one per row: the server batches, as TF Serving would
    return out


def to_request(inputs: dict[str, np.ndarray]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.model_spec.signature_name = "next_items"
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(protos.to_proto(value))
    return request


def start_server(base: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model-base-path", base, "--model-name", NAME,
         "--port", "0", "--enable-batching", "--max-batch-size", "32",
         "--batch-timeout-micros", str(BATCH_TIMEOUT_MICROS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        m = READY.match(line.strip())
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, m.group(1)
    raise RuntimeError(f"serving.server exited with {proc.wait()} before it was ready")


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1e3, q)), 3)


def main(argv=None) -> int:
    parser = bench_lib.Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (under 2 minutes)")
    parser.add_argument("--repeat-head", action="store_true",
                        help="the default model with the repeat head (requests carry its history_size items)")
    # (each request carries them as strings: 64 requests are built, and one request over
    # gRPC's message size limit would fail)
    parser.add_argument("--history-items", type=bench_lib.at_most(MAX_HISTORY_ITEMS,
                                                                  bench_lib.non_negative_int),
                        help="with --repeat-head: history items per request (default: the "
                             "model's history_size)")
    args = parser.parse_args(argv)
    if args.history_items is not None and not args.repeat_head:
        parser.error("--history-items needs --repeat-head")
    history = HierTCNConfig().history_size if args.repeat_head else 0
    if args.history_items is not None:
        history = args.history_items
    starts = HierTCNConfig().start_items if args.repeat_head else 0
    n_latency, qps_seconds = (300, 5.0) if args.quick else (2000, 20.0)
    _import_tensorflow()

    with tempfile.TemporaryDirectory() as base:
        path, vocab = build_export(base, args.repeat_head)
        fn = tf.saved_model.load(path).signatures["next_items"]
        h = int(fn.structured_input_signature[1]["user_state"].shape[1])
        inputs = make_inputs(vocab, 64, h, history, starts)
        tensors = [{k: tf.constant(v) for k, v in x.items()} for x in inputs]
        requests = [to_request(x) for x in inputs]
        proc, target = start_server(base)
        errors = 0
        try:
            channel = grpc.insecure_channel(target)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for t, r in zip(tensors[:20], requests[:20]):
                fn(**t)
                stub.Predict(r, timeout=30)
            # Interleaved, so both see the same machine load: the ratio is what counts.
            local, remote = [], []
            for i in range(n_latency):
                t0 = time.perf_counter()
                fn(**tensors[i % len(tensors)])
                t1 = time.perf_counter()
                try:
                    stub.Predict(requests[i % len(requests)], timeout=30)
                except grpc.RpcError:
                    errors += 1
                t2 = time.perf_counter()
                local.append(t1 - t0)
                remote.append(t2 - t1)
            del fn

            stop = time.perf_counter() + qps_seconds
            counts = [0] * CLIENTS
            failures = [0] * CLIENTS

            def worker(c: int) -> None:
                own = grpc.insecure_channel(target)
                own_stub = prediction_service_pb2_grpc.PredictionServiceStub(own)
                i = c
                while time.perf_counter() < stop:
                    try:
                        own_stub.Predict(requests[i % len(requests)], timeout=30)
                        counts[c] += 1
                    except grpc.RpcError:
                        failures[c] += 1
                    i += CLIENTS
                own.close()

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(worker, range(CLIENTS)))
            qps = sum(counts) / (time.perf_counter() - t0)
            errors += sum(failures)
            channel.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    in_process_p50 = percentile_ms(local, 50)
    result = {
        "benchmark": "serving_latency",
        "p50_ms": percentile_ms(remote, 50),
        "p99_ms": percentile_ms(remote, 99),
        "qps_8_clients": round(qps, 1),
        "grpc_overhead_ratio": round(percentile_ms(remote, 50) / in_process_p50, 3),
        "in_process_p50_ms": in_process_p50,
        "in_process_p99_ms": percentile_ms(local, 99),
        "errors": errors,
        "workload": {"items": ITEMS, "session_length": SESSION_LENGTH, "k": K, "batch": 1,
                     "clients": CLIENTS, "latency_requests": n_latency, "qps_seconds": qps_seconds,
                     "model": f"hiertcn default dims (E=C=128, H={h}), random weights",
                     "repeat_head": args.repeat_head, "history_items": history, "start_items": starts,
                     "server": "serving.server --enable-batching --max-batch-size 32 "
                               f"--batch-timeout-micros {BATCH_TIMEOUT_MICROS}",
                     **bench_lib.machine(), "load_average_1m": round(os.getloadavg()[0], 2),
                     "quick": args.quick},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(bench_lib.run(main))
