"""The benchmarks run end to end with --quick and print their JSON line (issue 6),
so the scripts never rot. Figures are not asserted (the machine is shared and noisy);
the keys and their basic sanity are."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML1M = os.path.join(os.path.dirname(ROOT), "shared", "data", "ml-1m")


def run_quick(name: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--quick",
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_speed_quick():
    result = run_quick("train_speed")
    for setting in ("softmax", "sampled"):
        r = result[setting]
        assert {"hiertcn_vs_hrnn", "hiertcn_vs_gru4rec", "hiertcn_vs_tcn", "mfu", "models"} <= set(r)
        assert set(r["models"]) == {"hiertcn", "hrnn", "gru4rec", "tcn"}
        for m in r["models"].values():
            assert m["events_per_s"] > 0 and m["flops_per_event"] > 0 and 0 < m["mfu"]
    choices = result["choices_sampled_hiertcn_events_per_s"]
    assert choices["packed"] > 0 and choices["padded"] > 0
    for inp in (choices["input"], choices["input_streamed"]):
        assert {"prebuilt_us_per_event", "generator_us_per_event", "generator_overhead"} <= set(inp)
        lo, hi = inp["generator_overhead_ci95"]
        assert lo <= inp["generator_overhead"] <= hi and inp["pairs"] == 2
        assert len(inp["generator_overhead_blocks"]) == 2
    assert result["peak_matmul_gflops"] == max(result["peak_matmul_gflops_start_end"]) > 0
    assert 0 < result["workload"]["padding_fraction"] < 1
    # the machine the figures come from (ratios differ between AVX2 and AVX-512 machines)
    assert result["workload"]["cpus"] == os.cpu_count() and result["workload"]["cpu"]
    large = result["large_catalogue"]
    assert large["vocab_size"] == 20_000
    assert large["lazy_adam"]["hiertcn_events_per_s"] > 0 and large["lazy_adam"]["hrnn_events_per_s"] > 0
    assert large["adam"] is None and large["hiertcn_lazy_vs_adam"] is None  # full runs only


@pytest.mark.skipif(not os.path.isdir(ML1M), reason="../shared/data/ml-1m is not available")
def test_data_memory_quick():
    result = run_quick("data_memory")
    for name in ("ml1m", "synthetic", "synthetic_long"):
        r = result[name]
        assert r["hiertcn_bytes"] > 0 and r["tcn_whole_history_bytes"] > 0
        assert r["data_memory_reduction"] == pytest.approx(
            1 - r["hiertcn_bytes"] / r["tcn_whole_history_bytes"], abs=1e-3)
        # cut at the TCN baseline's 256 tokens: never wider than the whole histories
        assert 0 < r["tcn_truncated_bytes"] <= r["tcn_whole_history_bytes"]
        assert r["tcn_truncated_bytes"] <= 8 * 32 * 256  # B x 256 int64 at most
        assert r["reduction_vs_truncated_tcn"] == pytest.approx(
            1 - r["hiertcn_bytes"] / r["tcn_truncated_bytes"], abs=1e-3)
    assert result["data_memory_reduction"] == result["ml1m"]["data_memory_reduction"]
    # The same HierTCN batch; only the flat TCN's whole-history batch grows with history.
    assert (result["synthetic_long"]["history_tokens_mean"]
            > 10 * result["synthetic"]["history_tokens_mean"])
    assert (result["synthetic_long"]["data_memory_reduction"]
            > result["synthetic"]["data_memory_reduction"])
    assert set(result["peak_memory"]) == {"hiertcn", "tcn_streaming", "tcn_whole_history"}
    assert all(p["peak_rss_mb"] >= p["rss_before_steps_mb"] > 0 for p in result["peak_memory"].values())


def test_scale_quick():
    result = run_quick("scale")
    assert set(result["sizes"]) == {"1000", "10000"}
    assert all(s["events_per_s"] > 0 and s["peak_rss_mb"] > 0 for s in result["sizes"].values())
    assert result["memory_growth"] > 0


def test_serving_latency_quick():
    """A real export behind `serving.server` on loopback, gRPC clients: the latency, rate
    and overhead keys (the head's path with --repeat-head is the same script)."""
    result = run_quick("serving_latency")
    assert result["benchmark"] == "serving_latency" and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["qps_8_clients"] > 0
    assert result["grpc_overhead_ratio"] > 0 and result["workload"]["quick"] is True


def test_quick_keeps_the_sizes_the_command_line_gives():
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_lib
    finally:
        sys.path.pop(0)
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--users", type=int, default=2300)
    p.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default="10,20")
    for argv, expected in ((["--quick"], (100, [1, 2])),
                           (["--quick", "--users", "2300"], (2300, [1, 2])),  # given, kept
                           (["--quick", "--sizes=5,6"], (100, [5, 6]))):
        args = p.parse_args(argv)
        bench_lib.quick_values(p, argv, args, users=100, sizes=[1, 2])
        assert (args.users, args.sizes) == expected


def test_pipeline_throughput_quick_in_every_file_format():
    """The pipeline benchmark on the same 50,000 synthetic events as CSV, Parquet and
    Avro: the same rows read and written."""
    runs = {f: run_quick("pipeline_throughput", "--format", f) for f in ("csv", "parquet", "avro")}
    for fmt, result in runs.items():
        assert result["benchmark"] == "pipeline_throughput" and result["format"] == fmt
        assert result["events"] == 50_000 and result["events_per_s"] > 0
        assert 0 < result["peak_rss_mb"] < 4096 and result["input_bytes"] > 0
        assert result["sessions_per_user"] == [5, 30]
    assert len({r["rows_written"] for r in runs.values()}) == 1
    assert runs["csv"]["rows_written"] > 40_000


def _benchmark_module(name: str):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _bench_lib():
    return _benchmark_module("bench_lib")


def test_pipeline_throughput_reads_a_run_that_writes_more_than_a_pipe_holds():
    """The benchmark's measured run may write more than 64 KiB (`-- --beam-logs`; the
    pipeline's replay of held-back stderr): it ends and gives stdout and the failure's
    stderr back (static audit: pipes read only after the run ended, which then waited on
    a full pipe for ever)."""
    import threading

    bench = _benchmark_module("pipeline_throughput")
    child = ("import sys; sys.stderr.write('x' * 300_000 + 'END'); print('y' * 300_000); "
             "sys.exit({})")
    result = {}

    def run():
        result["ok"] = bench._run_measured([sys.executable, "-c", child.format(0)])
        with pytest.raises(SystemExit, match=r"(?s)pipeline failed \(3\):.*xEND$"):
            bench._run_measured([sys.executable, "-c", child.format(3)])
        result["failed"] = True

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the run waited on a full pipe"
    assert result["ok"][2] == "y" * 300_000 + "\n" and result["failed"]


def test_flops_per_event_hrnn_counts_the_session_gru_step_over_the_last_item():
    """HRNN runs its session GRU over [start, a1 .. am]: m steps give the m targets' user
    vectors, the (m + 1)-th the final state that the user GRU takes at the session's end."""
    bench_lib = _bench_lib()
    config = bench_lib.model_config("hrnn", "sampled", 256)
    gru, spe = (lambda inputs, units: 6 * (inputs + units) * units), 0.25
    per_event = gru(128, 128) + 2 * 128 * 257
    per_session = 2 * gru(128, 128) + 2 * 256 * 128 + gru(128, 128)
    assert bench_lib.flops_per_event("hrnn", config, 1000, spe) == pytest.approx(
        3 * (per_event + spe * per_session))


class _Array:
    def __init__(self, value):
        import numpy as np
        self.value = np.asarray(value)

    def numpy(self):
        return self.value

    @property
    def shape(self):
        return self.value.shape


def _batch(items, reset, end):
    return {"items": _Array([items]), "reset": _Array([reset]), "session_end": _Array([end]),
            "valid": _Array([[any(slot) for slot in items]])}


def test_flat_tcn_taps_on_its_users_left_padding_are_not_counted():
    """The flat TCN's tokens: a separator before each session's first chunk, then the
    items; a tap reading s tokens back of one of its user's first s tokens reads the zero
    left padding (Keras's causal Conv1D computes it, on padding): not work, as HierTCN's
    taps before a slot's start are not."""
    bench_lib = _bench_lib()
    first = _batch([[5, 6, 0], [7, 0, 0]], [True, False], [True, True])      # tokens 0 .. 4
    second = _batch([[8, 9, 10], [11, 0, 0]], [False, False], [False, True])  # 5 .. 9 (no SEP
    stats = bench_lib.batch_stats([second], before=[first], max_shift=12)    # before 11)
    assert stats["user_reach"] == pytest.approx([1] * 6 + [0.8, 0.6, 0.4, 0.2] + [0] * 3)
    assert bench_lib.batch_stats([second], max_shift=3)["user_reach"] == pytest.approx(
        [1, 0.8, 0.6, 0.4])
    config = bench_lib.model_config("tcn", "sampled", 256)
    reach = [1.0] * 16 + [0.5] * 200
    taps = sum(sum(reach[j * 2 ** i] if j * 2 ** i < len(reach) else 0 for j in range(5))
               for i in range(6))
    assert bench_lib.flops_per_event("tcn", config, 1000, 0.25, reach) == pytest.approx(
        3 * (1.25 * taps * 2 * 128 * 128 + 2 * 128 * 257))
    assert bench_lib.flops_per_event("tcn", config, 1000, 0.25) == pytest.approx(
        3 * (1.25 * 30 * 2 * 128 * 128 + 2 * 128 * 257))


HUGE = str(10 ** 30)


def _usage_error(capsys, name: str, argv: list[str], option: str) -> str:
    """`name`'s parse_args on `argv` ends in one `error:` line naming `option` (status 2),
    before any work: the line."""
    module = _benchmark_module(name)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{os.path.basename(sys.argv[0])}: error: ")
    assert option in err, err
    return err


@pytest.mark.parametrize("argv, option", [
    (["--quick", "--seed", "-1"], "--seed"),
    (["--events", HUGE], "--events"),
    (["--quick", "--", "--output", "/tmp/x"], "--output"),
    (["--quick", "--", "--input=log.csv"], "--input"),
    (["--quick", "--", "--out", "/tmp/x"], "--out"),
    (["--", "--format", "csv"], "--format"),
    (["--quick", "--sessions", "3,1"], "--sessions"),
    (["--quick", "--sessions", "0,3"], "--sessions"),
    (["--quick", "--sessions", "1"], "--sessions"),
])
def test_pipeline_throughput_refuses_bad_options_at_once(capsys, argv, option):
    """(--seed -1 was numpy's ValueError traceback; --output after -- a FileNotFoundError
    after the whole run: the script gives the pipeline its --input, --output and --format)"""
    _usage_error(capsys, "pipeline_throughput", argv, option)


def test_pipeline_throughput_passes_other_options_on():
    args = _benchmark_module("pipeline_throughput").parse_args(
        ["--quick", "--", "--overwrite", "--direct_num_workers", "1"])
    assert args.pipeline_args == ["--overwrite", "--direct_num_workers", "1"]
    assert args.sessions == (5, 30)
    assert _benchmark_module("pipeline_throughput").parse_args(
        ["--quick", "--sessions", "1,3"]).sessions == (1, 3)


@pytest.mark.parametrize("name, option", [
    ("train_speed", "--data"), ("scale", "--data"),
    ("data_memory", "--ml1m"), ("data_memory", "--synthetic")])
def test_an_empty_data_folder_is_refused(capsys, name, option):
    """(an empty value was taken as the option left out: the script built its own data)"""
    _usage_error(capsys, name, [option, ""], option)


@pytest.mark.parametrize("name, option", [
    *[("train_speed", o) for o in ("--users", "--steps", "--batch-size", "--sessions-per-batch",
                                   "--input-pairs", "--warmup", "--max-session-length",
                                   "--num-negatives", "--catalogue")],
    *[("data_memory", o) for o in ("--users", "--long-users", "--batch-size",
                                   "--sessions-per-batch", "--steps", "--truncation",
                                   "--max-session-length")],
    *[("scale", o) for o in ("--sizes", "--base-users", "--steps", "--warmup")]])
def test_a_huge_count_is_refused(capsys, name, option):
    """(each started real work, or ended in a traceback after TensorFlow's start)"""
    _usage_error(capsys, name, [option, HUGE], option)


@pytest.mark.parametrize("name, argv, option", [
    ("train_speed", ["--users", "1"], "--users"),  # (an empty train split: no batch)
    ("train_speed", ["--users", "9999999"], "--users"),  # (over synthetic's events in memory)
    ("train_speed", ["--batch-size", "65536", "--sessions-per-batch", "65536"], "--batch-size"),
    ("data_memory", ["--max-session-length", "65536", "--batch-size", "65536"], "--batch-size"),
    *[("data_memory", ["--long-sessions", v], "--long-sessions")
      for v in ("600,400", "0,0", f"1,{HUGE}", "400")]])
def test_sizes_the_scripts_cannot_run_with_are_refused(capsys, name, argv, option):
    _usage_error(capsys, name, argv, option)


def test_data_memory_checks_given_folders_first(capsys, tmp_path):
    """(a missing folder, a file or a folder that is no pipeline output was said only when
    read, after minutes of building the other data sets)"""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for option in ("--ml1m", "--synthetic"):
        for path, said in (("missing", "not found"), ("empty", "stats.json"),
                           ("file", "is a file, not a folder")):  # (was "file/stats.json")
            err = _usage_error(capsys, "data_memory", [option, str(tmp_path / path)], option)
            assert said in err, err


def test_scale_checks_its_data_folder_and_data_memory_names_its_own(capsys, tmp_path):
    """(scale.py's --data was read only after parsing, a bare "error: ..." without its usage
    line or status 2; data_memory.py took --data, its probes' option, and ran its default
    data sets for minutes)"""
    (tmp_path / "empty").mkdir()
    for path, said in (("missing", "not found"), ("empty", "stats.json")):
        err = _usage_error(capsys, "scale", ["--data", str(tmp_path / path)], "--data")
        assert said in err, err
    err = _usage_error(capsys, "data_memory", ["--data", str(tmp_path)], "unrecognized")
    assert "--ml1m DIR and --synthetic DIR" in err, err


def test_serving_latency_refuses_a_huge_history_at_once():
    """(--history-items 10**30 was a traceback after the export was built; a bad option
    came after TensorFlow's start and its notes, about 10 s)"""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serving_latency.py"),
                           "--repeat-head", "--history-items", HUGE], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("serving_latency.py: error: argument --history-items"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
