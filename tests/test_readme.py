"""The README's commands stay true to the code: every `python -m MODULE ...` line it shows
names a real entry point, and every --flag it uses is one that entry point (or the
subcommand it names) accepts. The commands themselves run in `make demo`, the notebook
test and the end-to-end tests."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
# Beam's own options pass through the pipeline CLI to PipelineOptions.
BEAM_FLAGS = {"--runner", "--project", "--region", "--temp_location", "--setup_file",
              "--flink_master", "--environment_type", "--spark_master_url"}


def _commands():
    text = open(README, encoding="utf-8").read()
    # (every fenced block, whatever its language, so that one's closing fence is never
    # read as the next one's opening; the shell ones hold the commands)
    blocks = [body for tag, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
              if tag in ("", "bash")]
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m ") or line.startswith("python benchmarks/"):
                lines.append(line)
    return lines


COMMANDS = _commands()


def test_readme_benchmarks_exist():
    scripts = {shlex.split(c)[1] for c in COMMANDS if c.startswith("python benchmarks/")}
    assert scripts and all(os.path.exists(os.path.join(ROOT, s)) for s in scripts), scripts


def test_readme_shows_the_front_door_and_every_stage():
    text = open(README, encoding="utf-8").read()
    assert "make demo" in text and "make test" in text
    modules = {shlex.split(c)[2] for c in COMMANDS if c.startswith("python -m")}
    assert {"pipeline", "pipeline.synthetic", "model.train", "model.evaluate", "model.compare",
            "serving.export", "serving.server", "serving.client"} <= modules


# Every entry point's --help (and each subcommand's) in one process: the real `__main__`
# code of each, run by runpy, for one TensorFlow import instead of one per command.
_HELP_SCRIPT = """
import contextlib, io, json, re, runpy, sys
import model, tensorflow  # the real one, before serving.client's command line can stand in for it

def help_of(argv):
    sys.argv = [argv[0], *argv[1:], "--help"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert not e.code, (argv, e.code)
    return buffer.getvalue()

out = {}
for module in json.loads(sys.argv[1]):
    out[module] = {"": help_of([module])}
    choices = re.search(r"\\{([a-z,-]+)\\}", out[module][""])
    for sub in (choices.group(1).split(",") if choices else []):
        out[module][sub] = help_of([module, sub])
print(json.dumps(out))
"""
MODULES = sorted({shlex.split(c)[2] for c in COMMANDS if c.startswith("python -m")})


@pytest.fixture(scope="module")
def helps():
    import json

    out = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, json.dumps(MODULES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_readme_flags_exist(module, helps):
    lines = [shlex.split(c.replace("...", "")) for c in COMMANDS
             if c.startswith("python -m") and shlex.split(c)[2] == module]
    top = helps[module][""]
    assert top.startswith("usage: ")
    for argv in lines:
        words = argv[3:]
        sub = next((w for w in words if not w.startswith("-") and w in helps[module]), None)
        for w in words:
            flag = w.split("=")[0]
            if not flag.startswith("--") or flag in BEAM_FLAGS:
                continue
            # the whole flag: --items is not accepted because --items-json is
            whole = re.compile(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])")
            assert whole.search(top) or (sub and whole.search(helps[module][sub])), (
                f"README uses {flag} with `python -m {module}`, which does not accept it")
