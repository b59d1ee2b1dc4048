"""`make demo`: the whole product end to end on the embedded synthetic log.

synthetic log → Beam pipeline → train HierTCN → evaluate (with popularity for scale) →
export a SavedModel → start the local TF Serving-compatible server → ask for next items
over gRPC for a few users across two sessions, the user state carried between them in the
SQLite state store → stop the server. Every stage runs the same command a user would type.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Sequence

from model import processes, quiet
from pipeline import argtypes, schema, synthetic
from serving import cli

PY = sys.executable
# A demo folder holds this file: only such a folder is replaced by the next demo.
MARKER = ".hiertcn-demo"


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(cmd: Sequence[str], capture: bool = False) -> str:
    """Runs one product command, echoing it; stops the demo with its output on failure."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(list(cmd), text=True, check=False,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        if capture and proc.stdout:
            print(proc.stdout)
        raise SystemExit(f"demo stopped: the command above failed with exit code {proc.returncode}")
    return proc.stdout or ""


class ServerOutput(threading.Thread):
    """Echoes a server's stdout as it comes and keeps the address from its first "serving
    NAME version V on HOST:PORT" line (the server binds --port 0 itself: a port picked here
    and bound there later could be taken in between)."""

    LINE = re.compile(r"^serving \S+ version \d+ on (\S+:\d+)$")

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.target, self.ready = pipe, None, threading.Event()

    def run(self) -> None:
        for line in self.pipe:
            sys.stdout.write(line)
            sys.stdout.flush()
            m = self.LINE.match(line.rstrip("\n"))
            if m and self.target is None:
                self.target = m[1]
                self.ready.set()
        self.ready.set()  # the server's output ended: no address to come


def wait_for_server(proc: subprocess.Popen, output: ServerOutput, model: str,
                    timeout: float = 120) -> str:
    """Waits for the server's address, then polls GetModelStatus until a version is
    AVAILABLE; returns the address."""
    deadline = time.monotonic() + timeout
    while not output.ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
    target = output.target
    if target is None:
        try:  # its output ended: it is exiting (a failed start), or it hangs
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"demo stopped: the server exited with code {proc.returncode}")
        raise SystemExit(f"demo stopped: the server did not become ready within {timeout:.0f} s")
    from model import quiet

    quiet.import_tensorflow()  # (the client's protos load it) its start-up notes held back
    from serving.client import HierTCNClient, ServingError

    with HierTCNClient(target, model, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"demo stopped: the server exited with code {proc.returncode}")
            try:
                status = client.status()
            except ServingError:
                status = []
            if any(s["state"] == "AVAILABLE" for s in status):
                print("server ready:", status)
                return target
            time.sleep(0.5)
    raise SystemExit(f"demo stopped: the server did not become ready within {timeout:.0f} s")


def pick_sessions(data_dir: str, users: int) -> list[tuple[str, list[str], list[str]]]:
    """Two consecutive test sessions of a few users (the first by id, so every run shows
    the same ones), as raw item ids."""
    vocab = schema.read_vocabulary(data_dir)
    picked = []  # (has no unknown item, user, first, second)
    for rec in schema.iter_users(data_dir, "test"):
        if len(rec.sessions) - rec.num_context_sessions >= 1 and rec.num_context_sessions >= 1:
            sessions = rec.sessions[rec.num_context_sessions - 1:rec.num_context_sessions + 1]
            first, second = ([vocab.ids[i] for i in s if i >= schema.NUM_RESERVED]
                             for s in sessions)
            if first and second:  # unknown items left out (a small log has many)
                whole = len(first) + len(second) == sum(len(s) for s in sessions)
                picked.append((not whole, len(rec.user_id), rec.user_id, first, second))
    return [p[2:] for p in sorted(picked)[:users]]


def prepare_output(out: str) -> None:
    """Creates the demo folder, replacing an earlier demo's; refuses any other folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"demo stopped: {out} is a file; pass another --output (make demo "
                         "DEMO_DIR=...)")
    if os.path.exists(out):
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise SystemExit(f"demo stopped: {out} exists and is not a demo's folder; pass "
                             "another --output (make demo DEMO_DIR=...) or remove it yourself")
        shutil.rmtree(out)
    try:
        os.makedirs(out)
        with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
            f.write("written by `python -m serving.demo`: the next demo replaces this folder\n")
    except OSError as e:  # (a parent that cannot hold folders: a traceback before)
        raise SystemExit(f"demo stopped: cannot create {out}: {e.strerror or e}; pass another "
                         "--output (make demo DEMO_DIR=...)") from None


def _stop(signum, frame):
    """SIGTERM: the running step and the server are stopped (the `finally`s), exit 130 as
    every command of the project stops (it was 1, a failed step's)."""
    print(f"demo stopped by signal {signum}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def main(argv: Sequence[str] | None = None) -> int:
    p = argtypes.Parser(prog="python -m serving.demo", description=__doc__.split("\n")[0],
                                formatter_class=argtypes.DefaultsHelpFormatter)
    p.add_argument("--output", default="demo_out", type=argtypes.tensorflow_folder,
                   help="folder for everything the demo writes")
    # (one user's log leaves the train split empty: the demo failed after its pipeline)
    p.add_argument("--users", type=argtypes.number(int, 2, high=synthetic.MAX_USERS),
                   default=None, help="synthetic users (default: the generator's demo size)")
    p.add_argument("--steps", type=argtypes.positive_int, default=600,
                   help="training steps (a short CPU run)")
    p.add_argument("--model-name", default="hiertcn", type=cli.model_name,
                   help="the served model's name")
    args = p.parse_args(argv)
    # (said before the log and the pipeline, not by the training)
    if error := quiet.keras_env_error():
        p.error(error)
    out = os.path.abspath(args.output)
    prepare_output(out)
    import signal

    signal.signal(signal.SIGTERM, _stop)  # a kill runs the `finally` that stops the server
    raw, data, run_dir = f"{out}/raw/log.csv", f"{out}/data", f"{out}/run"
    export, db = f"{out}/export", f"{out}/state.db"

    say("1/7 Generating a synthetic interaction log (users with long-term interests that "
        "drift, session intents, popularity skew and repeat visits)")
    os.makedirs(os.path.dirname(raw))
    users = [] if args.users is None else ["--users", str(args.users)]
    run([PY, "-m", "pipeline.synthetic", "--output", raw, "--seed", "0", *users])

    say("2/7 Beam pipeline: sessionize (30 min gap), split by time (80/10/10), build the "
        "vocabulary, write TFRecord session sequences")
    run([PY, "-m", "pipeline", "--input", raw, "--output", data])
    stats = schema.read_stats(data)
    print(json.dumps({k: stats[k] for k in ("rows_read", "rows_malformed", "rows_filtered",
                                            "rows_written", "splits", "items")}, indent=1))

    say(f"3/7 Training HierTCN for {args.steps} steps on CPU (queue-based batches, state cache; "
        "the weights with the best valid Recall@20 are kept)")
    run([PY, "-m", "model.train", "--data", data, "--model", "hiertcn", "--model-dir", run_dir,
         "--steps", str(args.steps), "--eval-every", "100"])

    say("4/7 Evaluating on the test split: full-catalogue ranking of every next item, "
        "online over each user's sessions")
    for name, extra in (("hiertcn", ["--model-dir", run_dir]), ("popularity", ["--model", "popularity"])):
        path = f"{out}/test_{name}.json"
        run([PY, "-m", "model.evaluate", "--data", data, "--split", "test", *extra,
             "--output", path], capture=True)
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        print(f"  {name:<11} Recall@20 {m['recall@20']:.4f}  MRR@20 {m['mrr@20']:.4f} over "
              f"{m['events']:,} next items in sessions; first items of "
              f"{m['first_item']['events']:,} sessions: Recall@20 "
              f"{m['first_item']['recall@20']:.4f}")

    say("5/7 Exporting a SavedModel for TensorFlow Serving (signatures update_state, "
        "next_items, user_embedding, known_items, item_vectors)")
    run([PY, "-m", "serving.export", "--model-dir", run_dir, "--export-base", export])
    print("versions:", sorted(os.listdir(export)))

    say("6/7 Starting the local TF Serving-compatible gRPC server on a free loopback port")
    server = subprocess.Popen(processes.dying_with_parent([
        PY, "-m", "serving.server", "--model-base-path", export, "--model-name",
        args.model_name, "--port", "0"]), stdout=subprocess.PIPE, text=True)
    output = ServerOutput(server.stdout)
    output.start()
    try:
        target = wait_for_server(server, output, args.model_name)
        say("7/7 Asking for next items over gRPC, across two sessions per user "
            f"(state kept in {os.path.basename(db)})")
        client = [PY, "-m", "serving.client", "--target", target, "--model-name",
                  args.model_name, "--state-db", db]
        for user, first, second in pick_sessions(data, users=2):
            print(f"\n-- user {user}: a new user starts from a zero state")
            run(client + ["recommend", "--user", user, "--items", ",".join(first[:2]), "-k", "5"])
            print(f"-- user {user} finishes session 1 ({len(first)} items): the high-level "
                  "GRU folds it into the stored state")
            run(client + ["end-session", "--user", user, "--items", ",".join(first)])
            print(f"-- user {user} starts session 2 with {second[0]}: recommendations now "
                  "use the carried state")
            run(client + ["recommend", "--user", user, "--items", second[0], "-k", "5"])
            print(f"   (the item that came next in the log: {second[1] if len(second) > 1 else '-'})")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # (its SIGTERM handler hung): not left running
            server.kill()
            server.wait()
        output.join(timeout=10)  # its last lines before the demo's own
    say(f"Done. Everything is in {out}: data/, run/ (checkpoints, TensorBoard), export/, state.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
