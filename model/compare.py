"""Trains and evaluates several models on equal budgets and writes a comparison report.

    python -m model.compare --data DIR --models hiertcn,hrnn,gru4rec,tcn,sknn,popularity \
        --output FOLDER [--budget-steps N | --budget-minutes M] [--seeds 3]

Each neural model is trained with `python -m model.train` (one run folder per model and
seed under FOLDER/runs, so rerunning resumes and finished runs are reused) and evaluated
once on the test split with `python -m model.evaluate`; the models that need no training
are fitted inside `model.evaluate`. Model selection uses the valid split only: training
evaluates on valid every `--eval-every` steps and at the end, and the checkpoint with the
best valid Recall@20 (`RUN/best/`) is the one tested. Outputs: `results.json` = {"models": {NAME: METRICS + std + train_seconds +
events_per_s + parameters}} (train_seconds and events_per_s null for a fitted baseline), `results.md` (a table, best value per column in bold, HierTCN's
relative gain over the best baseline) and `results.png` (Recall@20 / MRR@20 per model);
`results_valid.*` with `--split valid`.
Each test evaluation also writes the users' metric sums (`test_users.npz`), so that
HierTCN's difference from the best baseline comes with a 95% confidence interval and a
p-value from a paired bootstrap over the test users (`relative_gain.KEY.paired`).

A rerun reuses a run only when it was made with the same training options and the same
data (`compare_run.json` in each run folder records them); a neural run trained with other
options is refused with the difference, a fitted model is evaluated again. Evaluations are
kept per split (`test.json`, `valid.json`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from typing import Sequence

import numpy as np

from model import config as config_lib, processes, quiet
from model.atomic import write_atomically, write_json, write_text
from model.baselines import NAMES as FITTED
from model.evaluate import code_digest, read_per_user
from model.metrics import GROUPS, METRIC_KEYS, p_floor, paired_bootstrap
from pipeline import argtypes, schema, storage

NEURAL = config_lib.MODEL_NAMES  # trained with model.train; FITTED: fitted in model.evaluate
HEADLINE = ("recall@20", "mrr@20")
RECORD = "compare_run.json"
SUMMARY = "train_summary.json"  # model.train's, written when a run ends (finished or stopped)
RUN_CONFIG = "config.json"  # model.train's (registry.CONFIG_FILE; registry loads TensorFlow)
# stats.json options that do not change the data written (where and how the pipeline ran)
NOT_DATA = ("input", "output", "runner", "beam_logs")
# stats.json keys that describe the input's rejected rows or its times, which the input
# and options already decide (added in later versions: a folder rebuilt with one is the
# same data)
NOT_DATA_STATS = ("malformed_reasons", "session_event_pairs", "same_time_pairs", "late_events",
                  "pipeline_version", "float_user_pairs", "same_time_pairs_in_id_order",
                  "users_sessionized", "users_with_no_session",
                  "time_ordered_pairs_by_input_order", "same_time_pairs_by_split")
# stats.json keys ("stats", KEY) and pipeline options ("options", KEY) added since runs
# first recorded their data's digest (2026-12-01), newest first: an older version's record
# holds the digest without those added after it, which the same log rebuilt by this
# version's pipeline gives when they are left out (`data_fingerprints`; its runs were
# refused as "trained on other data"). A key added to stats.json goes first here (a test
# holds the pipeline's keys to this list).
LATER_KEYS = (("stats", "users_written"), ("stats", "train_items_below_min_count"),
              ("options", "gap_by_default"), ("stats", "heaviest_user"),
              ("stats", "max_session_events"), ("options", "filter"),
              ("stats", "unknown_target_events"), ("stats", "max_user_events"),
              ("stats", "sessions_overlapping"), ("options", "session_col"),
              ("options", "delimiter"))


class CompareError(ValueError):
    """A bad option or a failed run, reported in one line; `exit_code` is compare's (2 for a
    usage or data error, as the commands it runs use it; 1 for a run that failed otherwise,
    e.g. for want of room)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def parse_model_names(text: str) -> list[str]:
    """Splits and validates `--models` (neural names may carry a variant suffix)."""
    given = [n.strip() for n in text.split(",")]
    names = [n for n in given if n]
    if not names:
        raise CompareError("--models is empty: name at least one model")
    if len(names) < len(given):  # (it was dropped: a typo's missing model went unsaid)
        raise CompareError(f"--models {text!r} holds an empty name (two commas in a row, or "
                           "one at an end): name each model between commas")
    for n in names:
        base, colon, label = n.partition(":")
        if colon and (not label.strip() or ":" in label):
            raise CompareError(f"--models {n!r}: a variant is MODEL:LABEL, one non-empty label "
                               "after one colon (e.g. hiertcn:plain)")
        if base not in NEURAL + FITTED:
            raise CompareError(
                f"unknown model {n!r} in --models: choose from {', '.join(NEURAL + FITTED)}")
    if len(set(names)) != len(names):
        raise CompareError(f"--models names a model twice: {text!r}")
    return names


def aggregate(runs: Sequence[dict]) -> dict:
    """Mean of the metrics JSON of several seeds, plus `std` with the same keys.

    Args:
      runs: metrics dicts of DESIGN §6 (numbers at top level and in GROUPS objects).

    Returns:
      The mean metrics, `std` (population std over seeds, same nesting) and `seeds`.
    """
    if not runs:
        raise CompareError("no run to aggregate")

    def numeric_keys(d: dict) -> list[str]:
        return [k for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]

    out: dict = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float, dict))}
    std: dict = {}
    for k in numeric_keys(runs[0]):
        vals = np.array([r[k] for r in runs], dtype=np.float64)
        out[k], std[k] = float(vals.mean()), float(vals.std())
    for g in GROUPS:
        if isinstance(runs[0].get(g), dict):
            out[g], std[g] = {}, {}
            for k in numeric_keys(runs[0][g]):
                vals = np.array([r[g][k] for r in runs], dtype=np.float64)
                out[g][k], std[g][k] = float(vals.mean()), float(vals.std())
    out["std"] = std
    out["seeds"] = len(runs)
    return out


def relative_gain(results: dict, ours: str = "hiertcn",
                  per_user: dict[str, dict[str, np.ndarray]] | None = None) -> dict:
    """HierTCN's relative gain over the best other model on the headline metrics and,
    with both models' `per_user` sums (`seeds_per_user`), how sure the difference is
    (`paired`: `metrics.paired_bootstrap` over the test users).

    Variants of `ours` (`hiertcn:LABEL`, e.g. the session-only ablation) are not baselines.
    """
    models = results["models"]
    baselines = [n for n in models if n.split(":", 1)[0] != ours]
    if ours not in models or not baselines:
        return {}
    per_user = per_user or {}
    gains = {}
    for key in HEADLINE:
        best_name = max(baselines, key=lambda n: models[n][key])
        best = models[best_name][key]
        gains[key] = {"best_baseline": best_name, "baseline": best, "hiertcn": models[ours][key],
                      "relative_gain": (models[ours][key] - best) / best if best > 0 else None}
        a, b = per_user.get(ours), per_user.get(best_name)
        if a is not None and b is not None and _same_events(a, b):
            gains[key]["paired"] = paired_bootstrap(a[key], b[key], a["events"])
    return gains


def _same_events(a: dict, b: dict) -> bool:
    """Two models' per-user sums cover the same users with the same events."""
    return (a["user_id"].shape == b["user_id"].shape and bool(np.all(a["user_id"] == b["user_id"]))
            and bool(np.all(a["events"] == b["events"])) and a["events"].sum() > 0)


def seeds_per_user(paths: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The per-user sums (`model.evaluate --per-user-output`) of a model's seeds, averaged
    over the seeds (so that they sum to the mean over seeds of each metric); None when a
    file is missing or the seeds did not see the same users and events."""
    if not paths or not all(os.path.exists(p) for p in paths):
        return None
    runs = [read_per_user(p) for p in paths]
    if not all(_same_events(runs[0], r) for r in runs[1:]):
        return None
    out = {"user_id": runs[0]["user_id"], "events": runs[0]["events"]}
    for key in METRIC_KEYS:
        out[key] = np.mean([r[key] for r in runs], axis=0)
    return out


def _significance(g: dict) -> str:
    """`relative_gain`'s `paired` entry in words, for `results.md`."""
    p = g["paired"]
    verdict = "significant" if p["p_value"] < 0.05 else "not significant"
    # no resample crossed 0: the p-value is below what the resamples can resolve
    p_text = (f"p < {2 / p['rounds']:.2g}" if p["p_value"] == 0
              else f"p = {p['p_value']:.3f}")
    users = f"{p['users']:,} user{'' if p['users'] == 1 else 's'}"
    if 0 < p["p_value"] == p_floor(p["users"]):
        p_text += f" (the least a paired test over {users} can give)"
    return (f"; difference {p['difference']:+.4f}, 95% CI [{p['ci95'][0]:+.4f}, "
            f"{p['ci95'][1]:+.4f}], {p_text} by a paired bootstrap over {users}: {verdict}")


def _columns() -> list[tuple[str, str, bool]]:
    """(title, dotted key, higher is better) of the Markdown table."""
    cols = [(k.replace("recall", "R").replace("mrr", "MRR"), k, True) for k in METRIC_KEYS]
    titles = {"first_item": "first", "returning_users": "returning", "cold_users": "cold"}
    for g in GROUPS:
        title = titles.get(g, g)
        cols += [(f"{title} R@20", f"{g}.recall@20", True), (f"{title} MRR@20", f"{g}.mrr@20", True)]
    cols += [("train s", "train_seconds", False), ("events/s", "events_per_s", True),
             ("params", "parameters", False)]
    return cols


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _value(m: dict, key: str):
    """A model's value of a dotted key; None when missing or when the key is a metric of a
    group without events (a group's 0.0 then means nothing: no repeats in MovieLens, no
    cold users in a log whose users are all active before the split), or a headline metric
    of a split without a scored event (its 0.0 is a convention, which was bolded as the
    best)."""
    group = key.split(".", 1)[0] if "." in key else None
    if group is not None and _get(m, f"{group}.events") == 0:
        return None
    if group is None and key in METRIC_KEYS and m.get("events") == 0:
        return None
    return _get(m, key)


def markdown_table(results: dict) -> str:
    """The `results.md` text: one row per model, the best value per column in bold; "–"
    where a model has no value (a baseline's training time, a group without events)."""
    models = results["models"]
    cols = _columns()
    best = {}
    for _, key, higher in cols[:len(METRIC_KEYS) + 2 * len(GROUPS)]:
        vals = [v for v in (_value(m, key) for m in models.values()) if v is not None]
        if vals:
            best[key] = max(vals) if higher else min(vals)
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, m in models.items():
        cells = []
        for _, key, _ in cols:
            v = _value(m, key)
            if v is None:
                cells.append("–")
                continue
            if key in ("train_seconds", "events_per_s", "parameters"):
                cells.append(f"{v:,.0f}")
                continue
            s = f"{v:.4f}"
            sd = _get(m.get("std", {}), key)
            if sd is not None and m.get("seeds", 1) > 1:  # (± 0.0000: the seeds agree)
                s += f" ± {sd:.4f}"
            # bold what prints as the best (0.12344 and 0.12341 are both 0.1234)
            top = best.get(key) is not None and f"{v:.4f}" == f"{best[key]:.4f}"
            cells.append(f"**{s}**" if top else s)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gains = results["relative_gain"] if "relative_gain" in results else relative_gain(results)
    if gains:
        lines.append("")
        for key, g in gains.items():
            rel = "n/a" if g["relative_gain"] is None else f"{100 * g['relative_gain']:+.1f}%"
            sig = _significance(g) if "paired" in g else ""
            lines.append(f"HierTCN vs best baseline ({g['best_baseline']}) on {key}: "
                         f"{g['hiertcn']:.4f} vs {g['baseline']:.4f} ({rel}{sig})")
    first = next(iter(models.values()))
    events, cold = first.get("events"), _get(first, "cold_users.events")
    cold_text = "" if cold is None else f", {cold:,.0f} of them of cold users (no earlier sessions)"
    lines.append("")
    ruled = (", every model without the item the session is on among the candidates "
             "(--rule-out-current)") if results.get("rule_out_current") else ""
    if results.get("rule_out_seen"):
        ruled = (", every model without the items the user has had before among the "
                 "candidates (--rule-out-seen: a repeat target is a miss)")
    lines.append(f"Split `{results.get('split', 'test')}`, {events:,.0f} scored events (positions >= 2)"
                 f"{cold_text}, full-catalogue ranking, conservative ties{ruled} (README § "
                 "Evaluation protocol).")
    if events and first.get("unknown_targets") == events:
        lines.append(f"Every one of the {events:,.0f} targets is outside the training vocabulary "
                     "(the run folders' items.tsv): every figure is 0 for any model, not a "
                     "score.")
    ruling = [name for name, m in models.items() if m.get("rules_out_current")]
    if (ruling and len(ruling) < len(models) and not results.get("rule_out_current")
            and not results.get("rule_out_seen")):
        lines.append(f"{', '.join(f'`{n}`' for n in ruling)} rule{'s' if len(ruling) == 1 else ''} "
                     "out the item each event is on (HierTCN's head: the pipeline collapses "
                     "immediate repeats, so that item is never next); the other models rank "
                     "it as published. `--rule-out-current` gives every model that rule: the "
                     "like-for-like comparison (README § Repeat consumption).")
    if results.get("split") == "valid" and any(m.get("parameters") for m in models.values()):
        lines.append("The trained models' checkpoints were chosen on this split (their figures "
                     "lean optimistic against the fitted baselines'): compare on `test`.")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str) -> None:
    """Writes a PNG bar chart of Recall@20 and MRR@20 per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    for i, key in enumerate(HEADLINE):
        vals = [results["models"][n][key] for n in names]
        errs = [results["models"][n].get("std", {}).get(key, 0.0) for n in names]
        ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, yerr=errs, label=key)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel(f"Recall@20 / MRR@20 ({results.get('split', 'test')} split)")
    ruled_out = ("the current item ruled out" if results.get("rule_out_current") else
                 "the user's seen items ruled out" if results.get("rule_out_seen") else "")
    if ruled_out:  # (the plain chart's twin otherwise, beside it)
        ax.set_title(ruled_out, fontsize=9)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


class Status:
    """What the running command is doing, in one line: rewritten in place on a terminal
    (its step or user count and its last valid evaluation); elsewhere (a log file, CI) each
    valid evaluation of a training run, one line each."""

    _PROGRESS = re.compile(r"(?:^|\| )\s*(\d+)/(\d+) \[")  # Keras' Progbar, tqdm
    _VALID = re.compile(r"^step (\d+): valid recall@20 (\S+) mrr@20 (\S+)")

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label, self.position, self.valid, self.shown = "", "", "", False

    def start(self, label: str) -> None:
        self.label, self.position, self.valid = label, "", ""

    def on_line(self, line: str) -> None:
        progress = self._PROGRESS.search(line)
        valid = self._VALID.match(line)
        if progress:
            self.position = f"{progress[1]}/{progress[2]}"
        elif valid:
            self.valid = f"valid@{valid[1]} R@20 {valid[2]} MRR@20 {valid[3]}"
            if not self.tty:
                print(f"{self.label}: {line.strip()}", file=self.stream, flush=True)
        else:
            return
        if self.tty:
            text = ", ".join(t for t in (f"{self.label} {self.position}".strip(), self.valid) if t)
            try:  # (the stream's terminal: stdout may go to a file)
                width = os.get_terminal_size(self.stream.fileno()).columns - 1
            except (OSError, ValueError, AttributeError):
                width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _run(cmd: list[str], log_path: str, status: Status | None = None) -> None:
    """Runs one command, its output appended to a log (and shown by `status`); a failure
    raises CompareError, an interrupted command (exit 130: it saved a checkpoint)
    KeyboardInterrupt."""
    try:
        with open(log_path, "rb") as log:
            log.seek(-1, os.SEEK_END)
            cut = log.read(1) != b"\n"
    except OSError:  # (no log yet, or an empty one)
        cut = False
    with open(log_path, "a", encoding="utf-8") as log:
        # when it began (a log of several attempts, a scheduler's, said none); a line a
        # killed attempt cut short is ended first (the next command was stuck to it)
        log.write(("\n" if cut else "")
                  + time.strftime("# %Y-%m-%dT%H:%M:%SZ\n", time.gmtime())
                  + "$ " + " ".join(cmd) + "\n")
        log.flush()
        start = os.path.getsize(log_path)
        try:
            returncode = processes.run_stoppable(cmd, log, status.on_line if status else None)
        finally:
            if status:
                status.done()
    if returncode in (130, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if returncode != 0:
        with open(log_path, "rb") as log:  # the command's own error line, when it has one
            log.seek(max(start, os.path.getsize(log_path) - 65536))
            said = [line for line in log.read().decode("utf-8", "replace").splitlines()
                    if "error: " in line]
        raise CompareError(f"`{' '.join(cmd)}` failed with exit code {returncode}"
                           + (f" ({said[-1].strip()})" if said else "") + f": see {log_path}",
                           exit_code=2 if returncode == 2 else 1)


def run_model(name: str, args: argparse.Namespace, log_path: str) -> dict:
    """Trains (neural) and evaluates one model over the seeds; returns its aggregated entry."""
    base = name.split(":", 1)[0]
    if base in FITTED:
        folder = os.path.join(args.output, "runs", name)
        out = _split_file(folder, _variant(args))
        extra = args.eval_args.get(name, [])
        record = {"data": args.data_fingerprint, "model": base}
        if extra:
            record["eval_args"] = extra
        os.makedirs(folder, exist_ok=True)
        if _read_record(folder) != record:
            # fitted in seconds to minutes: evaluated again rather than refused, and the
            # evaluations of the other split go too (they were made on the other data)
            for stale in os.listdir(folder):
                if stale.endswith((".json", "_users.npz")):
                    os.remove(os.path.join(folder, stale))
            write_json(os.path.join(folder, RECORD), record, sort_keys=True)
        if not _evaluated(out):
            args.status.start(f"{args.label} fitting and evaluating on {args.split}")
            _evaluate(args, log_path, out, "--model", base, *extra)
        with open(out, encoding="utf-8") as f:
            entry = aggregate([json.load(f)])
        # (fitted inside model.evaluate: no training time to report, "–" in the table)
        entry.update(train_seconds=None, events_per_s=None, parameters=0)
        return entry
    runs, summaries = [], []
    for seed in range(args.seeds):
        run_dir = os.path.join(args.output, "runs", name, f"seed{seed}")
        out = _split_file(run_dir, _variant(args))
        record = _neural_record(name, seed, args)
        options = record["train"]
        _check_or_write_record(run_dir, record, args.data_alike)
        if not _evaluated(out):
            what = f"{args.label} seed {seed + 1}/{args.seeds}"
            if not _finished(run_dir):  # a finished run is evaluated as it is (--split valid)
                args.status.start(f"{what} training")
                _run([sys.executable, "-m", "model.train", "--data", args.data,
                      "--model-dir", run_dir, *options], log_path, args.status)
            args.status.start(f"{what} evaluating on {args.split}")
            _evaluate(args, log_path, out, "--model-dir", run_dir)
        with open(out, encoding="utf-8") as f:
            runs.append(json.load(f))
        with open(os.path.join(run_dir, SUMMARY), encoding="utf-8") as f:
            summaries.append(json.load(f))
    entry = aggregate(runs)
    entry["train_seconds"] = float(np.mean([s["seconds"] for s in summaries]))
    rates = [s["events_per_s"] for s in summaries if s.get("events_per_s") is not None]
    entry["events_per_s"] = float(np.mean(rates)) if rates else None  # (None: no step timed)
    entry["parameters"] = int(summaries[0]["parameters"])
    entry["steps"] = [s["steps"] for s in summaries]
    entry["best_steps"] = [(s.get("best") or {}).get("step") for s in summaries]
    entry["rules_out_current"] = _rules_out_current(run_dir)
    return entry


def _rules_out_current(run_dir: str) -> bool:
    """Whether the run's model rules out the item each event is on by itself (HierTCN's
    repeat head with `exclude_current`), from its config.json (a run saved before the
    option existed was trained without it)."""
    saved = config_lib.load_json(os.path.join(run_dir, RUN_CONFIG))
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    head = model.get("repeat_head")
    if head is None:  # (resolved when saved; `None` is the sampled loss's off)
        head = model.get("loss") != "sampled"
    return (saved.get("model_name") == "hiertcn" and bool(head)
            and bool(model.get("exclude_current", False)))


def _evaluated(out: str) -> bool:
    """A run's metrics file and its per-user sums are there, made by this code
    (`evaluate.code_digest`); one from before a change to the code is evaluated again."""
    if not (os.path.exists(out) and os.path.exists(_users_file(out))):
        return False
    try:
        with open(out, encoding="utf-8") as f:
            metrics = json.load(f)
        why = None if isinstance(metrics, dict) else "not a record of metrics"
    except (OSError, ValueError) as e:  # (not JSON: a traceback)
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    if why:
        print(f"note: {out} cannot be read ({why}): evaluating it again", file=sys.stderr)
        return False
    code = metrics.get("code")
    if code == code_digest():
        return True
    print(f"note: {out} was evaluated by other code (model/ changed since, or an older "
          "version): evaluating it again", file=sys.stderr)
    return False


def _finished(run_dir: str) -> bool:
    """The run ended by its budget (steps, epochs or minutes), not by an interrupt."""
    try:
        with open(os.path.join(run_dir, SUMMARY), encoding="utf-8") as f:
            return json.load(f).get("stopped_by") not in (None, "interrupted")
    except (OSError, ValueError):
        return False


def _trained(run_dir: str) -> bool:
    """The run folder holds a checkpoint (model.train saved at least one step)."""
    folder = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(folder) and any(n.endswith(".index") for n in os.listdir(folder))


def _train_options(name: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The `model.train` options of one seed's run, without --data and --model-dir."""
    base = name.split(":", 1)[0]
    # every model runs the whole budget (--patience 0): the tables' runs are the same ones
    options = ["--model", base, "--seed", str(seed), "--eval-every", str(args.eval_every),
               "--patience", "0"]
    if args.budget_steps:
        options += ["--steps", str(args.budget_steps)]
    if args.budget_minutes:
        options += ["--max-minutes", str(args.budget_minutes)]
    config = args.config.get(name) or args.config.get(base)
    if config:
        options += ["--config", os.path.abspath(config)]
    return options + args.train_args.get(name, [])


def _config_content(path: str | None):
    """A `--config` file's JSON (so that an edited file counts as other options)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"--config {path}: {e}") from None


def data_fingerprint(data: str) -> str:
    """A digest of the data folder's `stats.json` (its counts, cut-offs and the options that
    shape the data): a pipeline rerun into the same folder with other options or input
    changes it; the same data rebuilt elsewhere or with another runner does not."""
    return _digest(_read_stats(data), ())


def data_fingerprints(data: str) -> frozenset[str]:
    """The digests a run record of this data may hold: this version's, and each older
    version's (without the `LATER_KEYS` added after it)."""
    stats = _read_stats(data)
    return frozenset(_digest(stats, LATER_KEYS[:k]) for k in range(len(LATER_KEYS) + 1))


def _read_stats(data: str) -> dict:
    try:
        return schema.read_stats(data)
    except schema.DataError as e:
        raise CompareError(str(e)) from None


def _digest(stats: dict, left_out: Sequence[tuple[str, str]]) -> str:
    options = NOT_DATA + tuple(key for kind, key in left_out if kind == "options")
    stats = dict(stats, options={k: v for k, v in stats.get("options", {}).items()
                                 if k not in options})
    for key in NOT_DATA_STATS + tuple(key for kind, key in left_out if kind == "stats"):
        stats.pop(key, None)
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _read_record(folder: str) -> dict | None:
    path = os.path.join(folder, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _read_record_of(run_dir: str, record: dict, alike: frozenset[str]) -> dict | None:
    """A run folder's record, its data digest read as `record`'s where it is one of the
    same data's (`alike`: `data_fingerprints`, an older version's digest among them)."""
    old = _read_record(run_dir)
    if old is not None and old.get("data") in alike:
        old = dict(old, data=record["data"])
    return old


def _record_conflict(run_dir: str, record: dict, alike: frozenset[str] = frozenset()
                     ) -> str | None:
    """Why this command must not use a run folder (its recorded options or data differ
    from `record` and it holds a checkpoint, trained under them), else None."""
    old = _read_record_of(run_dir, record, alike)
    if old is None or old == record or not _trained(run_dir):
        return None
    if old.get("data") != record["data"]:
        why = "on other data (the data folder's stats.json differs)"
    elif old.get("config") != record["config"] and old.get("train") == record["train"]:
        why = "with another --config content"
    else:
        why = "with other options: " + _options_difference(old.get("train") or [], record["train"])
    return (f"{run_dir} was trained {why}; use another --output, or delete "
            f"{os.path.dirname(run_dir)} to train it again")


def _check_or_write_record(run_dir: str, record: dict, alike: frozenset[str] = frozenset()
                           ) -> None:
    """Records a run's options before it trains; refuses a run folder whose recorded
    options or data differ from this command's once it holds a checkpoint (trained under
    those options). A folder from a version without records is reused as it is."""
    old = _read_record_of(run_dir, record, alike)
    if old is None and _trained(run_dir):
        print(f"note: {run_dir} has no record of its training options (an older version's "
              "run); reusing it as it is", file=sys.stderr)
        return
    conflict = _record_conflict(run_dir, record, alike)
    if conflict:
        raise CompareError(conflict)
    if old != record:  # new, or an attempt that failed before a checkpoint
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, RECORD), record, sort_keys=True)


def _neural_record(name: str, seed: int, args: argparse.Namespace) -> dict:
    """What a neural run folder records of the command (`_check_or_write_record`)."""
    base = name.split(":", 1)[0]
    return {"data": args.data_fingerprint, "train": _train_options(name, seed, args),
            "config": _config_content(args.config.get(name) or args.config.get(base))}


def _preflight(names: Sequence[str], args: argparse.Namespace) -> None:
    """What would refuse the command, found before any model runs, so that a refused
    command leaves --output as it was (it once refitted the baselines listed before the
    refused run, on the other data)."""
    users = schema.read_stats(args.data).get("splits", {}).get(args.split, {}).get("users")
    if users == 0:
        raise CompareError(f"the {args.split} split of {args.data} has no users (see its "
                           f"{schema.STATS_FILE}): nothing to evaluate")
    neural = [name for name in names if name.split(":", 1)[0] not in FITTED]
    if neural and (error := quiet.keras_env_error()):  # (each training would fail in turn)
        raise CompareError(error)
    for name in neural:
        for seed in range(args.seeds):
            record = _neural_record(name, seed, args)  # (a missing --config file: said here)
            conflict = _record_conflict(os.path.join(args.output, "runs", name, f"seed{seed}"),
                                        record, args.data_alike)
            if conflict:
                raise CompareError(conflict)


def _options_difference(old: Sequence[str], new: Sequence[str]) -> str:
    """`--steps 100 then, 500 now; --dropout 0.3 then, not given now` from two option lists."""
    def as_dict(tokens: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        key = None
        for t in tokens:
            if t.startswith("--"):
                key, _, value = t.partition("=")
                out[key] = value
            elif key is not None:
                out[key] = (out[key] + " " + t).strip()
        return out

    a, b = as_dict(old), as_dict(new)
    parts = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            then = "not given" if key not in a else (a[key] or "given")
            now = "not given" if key not in b else (b[key] or "given")
            parts.append(f"{key} {then} then, {now} now")
    return "; ".join(parts) or f"{' '.join(old)} then, {' '.join(new)} now"


def _evaluate(args: argparse.Namespace, log_path: str, out: str, *which: str) -> None:
    """`model.evaluate` of one run (`which`: --model-dir RUN or --model NAME) on the
    compared split: metrics JSON to `out`, the per-user sums beside it."""
    _run([sys.executable, "-m", "model.evaluate", "--data", args.data, "--split", args.split,
          *which, "--output", out, "--per-user-output", _users_file(out),
          *(["--rule-out-current"] if args.rule_out_current else []),
          *(["--rule-out-seen"] if args.rule_out_seen else [])], log_path, args.status)


def _split_file(folder: str, split: str) -> str:
    """A run's metrics JSON on one split (`test.json`, `valid.json`; `_variant`)."""
    return os.path.join(folder, f"{split}.json")


def _variant(args: argparse.Namespace) -> str:
    """The evaluation's name in file names: the split, `_ruled_out` added with
    --rule-out-current, `_seen_ruled_out` with --rule-out-seen (their own files beside the
    plain evaluation's)."""
    return args.split + ("_ruled_out" if args.rule_out_current else
                         "_seen_ruled_out" if args.rule_out_seen else "")


def _users_file(metrics_json: str) -> str:
    """The per-user sums written beside a run's `SPLIT.json` (`SPLIT_users.npz`)."""
    return metrics_json[:-len(".json")] + "_users.npz"


def model_per_user(name: str, args: argparse.Namespace) -> dict[str, np.ndarray] | None:
    """`seeds_per_user` of one model's runs under `args.output`."""
    folder = os.path.join(args.output, "runs", name)
    if name.split(":", 1)[0] in FITTED:
        return seeds_per_user([_users_file(_split_file(folder, _variant(args)))])
    return seeds_per_user([_users_file(_split_file(os.path.join(folder, f"seed{s}"), _variant(args)))
                           for s in range(args.seeds)])


def _parse_pairs(values: Sequence[str], what: str, join: bool = False) -> dict[str, str]:
    """MODEL=VALUE options; a model named twice has its values joined (`join`: options
    of a command) or is refused (one value, such as a file)."""
    pairs = {}
    for v in values:
        if "=" not in v:
            raise CompareError(f"{what} takes MODEL=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        if k in pairs and not join:
            raise CompareError(f"{what} names {k!r} twice ({pairs[k]!r} and {val!r}): give "
                               "one")
        pairs[k] = f"{pairs[k]} {val}" if k in pairs else val
    return pairs


# `model.train` options that `model.compare` sets for every run alike: given in
# --train-args, argparse's last value would win, silently (a --seed there makes every seed
# the same run, a --patience stops a model before the budget)
COMPARE_SETS = ("--model", "--seed", "--eval-every", "--patience", "--max-minutes",
                "--data", "--model-dir", "--config")
# ... and `model.evaluate` options, in --eval-args: each would evaluate one model on another
# split, other users or with another filter than the rest, in the same table
COMPARE_SETS_EVAL = ("--data", "--split", "--model", "--model-dir", "--checkpoint", "--output",
                     "--per-user-output", "--max-users", "--sample-users", "--rule-out-current",
                     "--rule-out-seen")


def _taken(options: Sequence[str], sets: Sequence[str]) -> str | None:
    """The first of `options` (argv words) that names one of `sets`, in full or as the
    abbreviation argparse would take for it (`--spl` for `--split`), else None."""
    for option in options:
        key = option.split("=", 1)[0]
        if key.startswith("--") and len(key) > 2 and any(s.startswith(key) for s in sets):
            return key
    return None


def main(argv: Sequence[str] | None = None, command: bool = False) -> int:
    """Entry point; returns the exit status. `command` (`python -m model.compare`): once
    the results are written, stop signals are ignored."""
    p = argtypes.Parser(prog="python -m model.compare", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, type=argtypes.home_path,
                   help="pipeline output folder")
    p.add_argument("--models", default="hiertcn,hrnn,gru4rec,tcn,sknn,popularity",
                   help="comma-separated; a name may carry a label, e.g. hiertcn:deep or "
                        "sknn:noremind, to run one model twice with other --train-args or "
                        "--eval-args (default: %(default)s)")
    p.add_argument("--output", required=True, type=argtypes.tensorflow_folder,
                   help="folder for runs/ and results.json, .md, .png (results_valid.* with "
                        "--split valid)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=argtypes.positive_int,
                        help="training steps per neural model (default: model.train's, "
                             f"{config_lib.DEFAULT_STEPS} unless a --config sets train.steps "
                             "or train.epochs)")
    budget.add_argument("--budget-minutes", type=argtypes.positive_float,
                        help="training minutes per neural model (a faster model still "
                             f"stops at model.train's {config_lib.DEFAULT_STEPS} steps, which "
                             "size its learning-rate decay; more with --train-args "
                             "'NAME=--steps N')")
    p.add_argument("--seeds", type=argtypes.positive_int, default=3,
                   help="training seeds per neural model (default: %(default)s)")
    p.add_argument("--eval-every", type=argtypes.non_negative_int, default=100,
                   help="training steps between valid evaluations; the best-on-valid checkpoint "
                        "is the one tested (0: the last one; default: %(default)s)")
    p.add_argument("--split", default="test", choices=("valid", "test"),
                   help="the split the models are tested on (default: %(default)s)")
    p.add_argument("--rule-out-current", action="store_true",
                   help="evaluate every model without the item each session is on among the "
                        "candidates (model.evaluate --rule-out-current; HierTCN's default head "
                        "does so itself): results_*_ruled_out.*, beside the plain ones of a run "
                        "without it")
    p.add_argument("--rule-out-seen", action="store_true",
                   help="evaluate every model without the items each user has had before "
                        "among the candidates (model.evaluate --rule-out-seen: the filter of "
                        "already-rated items, for logs where an item is consumed once): "
                        "results_*_seen_ruled_out.*, beside the plain ones of a run without it")
    p.add_argument("--config", action="append", default=[], metavar="MODEL=FILE",
                   help="a config JSON for one model, or for every variant of a base name (repeatable)")
    p.add_argument("--train-args", action="append", default=[], metavar="MODEL=ARGS",
                   help="extra model.train arguments for one model, e.g. 'hiertcn:plain=--no-repeat-head'")
    p.add_argument("--eval-args", action="append", default=[], metavar="MODEL=ARGS",
                   help="extra model.evaluate arguments for one fitted baseline, e.g. "
                        "'sknn:noremind=--no-remind'")
    args = p.parse_args(argv)
    if args.rule_out_seen and args.rule_out_current:
        p.error("--rule-out-seen rules out the item the session is on as well: pass one of "
                "--rule-out-seen and --rule-out-current")
    with argtypes.sigterm_as_interrupt():  # a preempted job stops as on Ctrl-C
        return _main(args, command)


def results_files(output: str, split: str) -> list[str]:
    """OUTPUT/results.{md,png,json} of the test split; results_valid.* of --split valid
    (so that looking at valid never replaces the test table), results_test_ruled_out.*
    of --rule-out-current, results_test_seen_ruled_out.* of --rule-out-seen (`split` is
    `_variant`'s name)."""
    stem = "results" if split == "test" else f"results_{split}"
    return [os.path.join(output, f"{stem}.{kind}") for kind in ("md", "png", "json")]


def _replace_results(outputs: list[str], md: str, results: dict) -> None:
    """Writes the table, chart and results.json (`outputs`) in place of an earlier run's:
    the new ones are written whole beside them first (hidden `.tmp-*` files), then the old
    results.json goes and each new file is renamed over its old one, results.json last. A
    run that fails while writing them (a full disk) keeps the earlier results as they were
    (they were removed first: a disk that another writer filled meanwhile lost them), and
    one killed among the renames never leaves a table beside another run's results.json."""
    folder = os.path.dirname(outputs[0])
    staged = [os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(p)[1]}")
              for p in outputs]
    try:
        write_text(staged[0], md)
        bar_chart(results, staged[1])
        write_json(staged[2], results, sort_keys=True)
        if os.path.exists(outputs[2]):
            os.remove(outputs[2])
        for new, path in zip(staged, outputs):
            os.replace(new, path)
    finally:
        for new in staged:
            if os.path.exists(new):
                os.remove(new)


def _main(args: argparse.Namespace, command: bool = False) -> int:
    lock = None
    try:
        names = parse_model_names(args.models)
        if not schema.is_folder(args.data):
            raise CompareError(f"--data {args.data} is not a folder: run `python -m pipeline` first")
        args.config = _parse_pairs(args.config, "--config")
        args.train_args = {k: v.split() for k, v in
                           _parse_pairs(args.train_args, "--train-args", join=True).items()}
        args.eval_args = {k: v.split() for k, v in
                          _parse_pairs(args.eval_args, "--eval-args", join=True).items()}
        for what, given, sets, why in (
                ("--train-args", args.train_args, COMPARE_SETS,
                 "is set by model.compare for every run alike (--seeds, --eval-every, "
                 "--budget-minutes, --config MODEL=FILE; every model trains the whole budget)"),
                ("--eval-args", args.eval_args, COMPARE_SETS_EVAL,
                 "would evaluate one model otherwise than the rest: model.compare evaluates "
                 "every model alike (--split, --rule-out-current, --rule-out-seen; the same "
                 "split and users)")):
            for key, options in given.items():
                taken = _taken(options, sets)
                if taken:
                    raise CompareError(f"{what} {key}: {taken} {why}")
        for key, options in args.train_args.items():  # (under --budget-minutes they size
            taken = args.budget_steps and _taken(options, ("--steps", "--epochs"))  # the decay)
            if taken:
                raise CompareError(f"--train-args {key}: {taken} is set by --budget-steps "
                                   f"{args.budget_steps} for every model alike (argparse's "
                                   "last value would win, and results.json says the budget)")
        trained = [n for n in names if n.split(":", 1)[0] in NEURAL]
        fitted = [n for n in names if n.split(":", 1)[0] in FITTED]
        bases = {n.split(":", 1)[0] for n in trained}
        for what, keys, known in (("--config", args.config, set(trained) | bases),
                                  ("--train-args", args.train_args, set(trained))):
            for key in keys:
                if key not in known:
                    raise CompareError(f"{what} names {key!r}, which is not a trained model of "
                                       f"--models ({', '.join(trained) or 'none'})")
        for key in args.eval_args:
            if key not in fitted:
                raise CompareError(f"--eval-args names {key!r}, which is not a fitted baseline "
                                   f"of --models ({', '.join(fitted) or 'none'})")
        if not schema.is_remote(args.data):
            args.data = os.path.abspath(args.data)
        args.data_fingerprint = data_fingerprint(args.data)
        args.data_alike = data_fingerprints(args.data)
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CompareError(f"--output {args.output} is a file: pass a folder (created if "
                               "missing)")
        wrong = storage.output_folder_error("--output", args.output, args.data,
                                            "a model.compare output", "a folder")
        if wrong:
            raise CompareError(wrong)
        _preflight(names, args)
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as e:  # (a full disk, no permission: said below, as for a later write)
            if storage.storage_error(e) is not None or storage.path_error(e) is not None:
                raise
            # (a folder that cannot be made: /proc/nope/x was a FileNotFoundError traceback)
            raise CompareError(f"cannot make --output {args.output}: {e.strerror or e}"
                               + (f": {e.filename}" if e.filename else "")) from None
        lock = _lock_output(args.output)
        log_path = os.path.join(args.output, "compare.log")
        results = {"data": args.data, "split": args.split,
                   "rule_out_current": args.rule_out_current,
                   "rule_out_seen": args.rule_out_seen, "models": {},
                   "budget": {"steps": args.budget_steps, "minutes": args.budget_minutes,
                              "eval_every": args.eval_every,
                              "seeds": args.seeds}}
        args.status = Status()
        for i, name in enumerate(names, 1):
            t0 = time.monotonic()
            args.label = f"[{i}/{len(names)}] {name}"
            print(f"{args.label} ...", file=sys.stderr, flush=True)
            results["models"][name] = run_model(name, args, log_path)
            m = results["models"][name]
            print(f"[{i}/{len(names)}] {name}: recall@20 {m['recall@20']:.4f}  "
                  f"mrr@20 {m['mrr@20']:.4f}  ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        results["relative_gain"] = relative_gain(
            results, per_user={n: model_per_user(n, args) for n in names})
        md = markdown_table(results)
        _replace_results(results_files(args.output, _variant(args)), md, results)
        if command:  # done: a stop signal now would only kill a finished command
            processes.ignore_stop_signals()
        print(md)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        where = storage.path_error(e)
        if where:
            print(f"error: cannot write under {args.output}: {where}", file=sys.stderr)
            return 2
        reason = storage.reason_or_raise(e)
        print(f"error: cannot write under {args.output}: {reason}; the finished runs are "
              f"kept: {storage.remedy(reason)} and rerun the same command", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the finished runs are kept and an unfinished one has its last "
              "checkpoint; the same command resumes", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            os.close(lock)
    return 0


def _lock_output(output: str) -> int | None:
    """Locks --output for this command (`storage.lock_folder`): a second compare into it
    would evaluate and train beside the first. Returns the descriptor to close, or None.

    Raises:
      CompareError: another process holds it.
    """
    try:
        return storage.lock_folder(output)
    except BlockingIOError:
        raise CompareError(f"--output {output} is being written by another model.compare"
                           f"{storage.lock_holder(output)}: wait for it to end, or pass another "
                           "--output") from None


if __name__ == "__main__":
    # (`| tee` stopped by the same Ctrl-C: compare still stops its training run at a
    # checkpoint, and waits for it)
    processes.survive_closed_output()
    # (a result it cannot print, a full disk under `> log`: one line, status 1)
    sys.exit(processes.argtypes.say_lost_output(main(command=True)))
