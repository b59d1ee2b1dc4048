"""Throughput of `python -m pipeline` on a synthetic log (issue 2).

Workload: `pipeline.synthetic` log of N events (default 1,000,000; `--quick`: 50,000;
`--sessions MIN,MAX` sessions per user, default 5,30: `--sessions 1,3` makes a
clickstream's many light users, about nine times as many for the same events) in one CSV
file (`--format parquet`: the same events as one Parquet file written by pyarrow,
string ids, typed second timestamps, row groups of 131,072 rows; `--format avro`: as one
Avro file written by fastavro, deflate blocks, string ids, `timestamp-millis` times), run
through the pipeline CLI with its default local runner (FnApiRunner,
one worker process per core) and default options. Wall time includes interpreter and
Beam start-up; peak RSS sums the command and all its worker processes, sampled every
50 ms. Target on 2 cores: >= 50,000 events/s, peak < 2 GiB.

The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

import bench_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the log is held as a list of rows (about 200 bytes an event) before it is written
MAX_EVENTS = 100_000_000
# the pipeline's options that the benchmark sets itself (not to be given after --)
OWN_OPTIONS = ("--input", "--output", "--format")


def _run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Runs a command; returns (seconds, peak RSS MiB of it and its children, stdout). Its
    output goes to files, not pipes read after it ends: a pipe holds 64 KiB, and a run
    writing more (Beam's INFO lines with `-- --beam-logs`) would wait on it for ever."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = root.memory_info().rss + sum(
                    c.memory_info().rss for c in root.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"pipeline failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return seconds, peak / 2 ** 20, out.read()


def _to_parquet(csv_path: str) -> str:
    """The CSV log as one Parquet file beside it (string ids, timestamp[s] times); its path."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pcsv.read_csv(csv_path, convert_options=pcsv.ConvertOptions(
        column_types={"user": pa.string(), "item": pa.string(), "time": pa.int64()}))
    table = table.set_column(table.schema.get_field_index("time"), "time",
                             table["time"].cast(pa.timestamp("s")))
    path = csv_path[:-len(".csv")] + ".parquet"
    pq.write_table(table, path, row_group_size=131_072)
    os.remove(csv_path)
    return path


def _to_avro(csv_path: str, rows) -> str:
    """The log's rows as one Avro file beside the CSV (which is removed); its path."""
    import fastavro

    schema = fastavro.parse_schema({"type": "record", "name": "Event", "fields": [
        {"name": "user", "type": "string"}, {"name": "item", "type": "string"},
        {"name": "time", "type": {"type": "long", "logicalType": "timestamp-millis"}}]})
    path = csv_path[:-len(".csv")] + ".avro"
    with open(path, "wb") as f:
        fastavro.writer(f, schema, ({"user": str(r.user), "item": str(r.item),
                                     "time": int(r.time) * 1000} for r in rows), codec="deflate")
    os.remove(csv_path)
    return path


def parse_args(argv=None):
    p = bench_lib.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=bench_lib.at_most(MAX_EVENTS, bench_lib.positive_int),
                   default=1_000_000)
    p.add_argument("--quick", action="store_true", help="50,000 events (unless --events)")
    p.add_argument("--seed", type=bench_lib.non_negative_int, default=0)
    p.add_argument("--format", choices=("csv", "parquet", "avro"), default="csv",
                   help="the log's file format")
    p.add_argument("--sessions", type=bench_lib.session_range, default=(5, 30), metavar="MIN,MAX",
                   help="sessions per user, drawn uniformly (default 5,30; 1,3: many light "
                   "users, whose per-user work costs more per event)")
    p.add_argument("pipeline_args", nargs="*", help="extra pipeline/Beam options after -- "
                   f"(not {', '.join(OWN_OPTIONS)}: this script gives them)")
    args = p.parse_args(argv)
    for arg in args.pipeline_args:
        name = arg.split("=", 1)[0]
        # (the pipeline takes an option's unique prefix too: --out for --output)
        if len(name) > 2 and name.startswith("--") and any(o.startswith(name) for o in OWN_OPTIONS):
            p.error(f"{arg} after --: the benchmark gives the pipeline its own "
                    f"{', '.join(OWN_OPTIONS)} (its log's format: --format before --)")
    if args.quick:
        bench_lib.quick_values(p, argv, args, events=50_000)
    return args


def main(argv=None) -> int:
    """Generates the log, runs the pipeline, prints the JSON line."""
    args = parse_args(argv)
    n = args.events
    sys.path.insert(0, REPO)
    from pipeline import synthetic

    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        log = os.path.join(tmp, "log.csv")
        t0 = time.perf_counter()
        rows = synthetic.generate(users=10 ** 9, seed=args.seed, max_events=n,
                                  sessions=args.sessions)
        synthetic.write_csv(log, rows)
        if args.format == "parquet":
            log = _to_parquet(log)
        elif args.format == "avro":
            log = _to_avro(log, rows)
        gen_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "pipeline", "--input", log, "--output",
               os.path.join(tmp, "out"), "--format", args.format, *args.pipeline_args]
        seconds, peak_mb, out = _run_measured(cmd)
        print(out.strip())
        input_bytes = os.path.getsize(log)
        with open(os.path.join(tmp, "out", "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    events = stats["rows_read"]
    print(json.dumps({
        "benchmark": "pipeline_throughput",
        "events": events,
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
        "peak_rss_mb": round(peak_mb),
        "runner": " ".join([stats["options"]["runner"], *args.pipeline_args]),
        **bench_lib.machine(),
        "rows_written": stats["rows_written"],
        "generate_seconds": round(gen_s, 2),
        "format": args.format,
        "sessions_per_user": list(args.sessions),
        "input_bytes": input_bytes,
        "workload": f"synthetic log, {events} events, {len({r.user for r in rows})} users "
                    f"of {args.sessions[0]} to {args.sessions[1]} sessions, "
                    f"1 {dict(csv='CSV', parquet='Parquet', avro='Avro')[args.format]} file, "
                    "default pipeline options; wall time of the CLI incl. start-up",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(bench_lib.run(main))
