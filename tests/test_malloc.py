"""glibc's malloc keeps freed large blocks in the commands that train and evaluate
(model.malloc)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes and frees a 100 MB array six times (a step's logits, as TensorFlow's allocator
# takes them from malloc) and prints whether `keep_freed_memory` applied and the page
# faults of the last five.
_STEPS = """import json, resource, sys
import numpy as np
from model import malloc
applied = malloc.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(25_000_000, np.float32); del a
start = faults()
for _ in range(5):
    a = np.ones(25_000_000, np.float32); del a
print(json.dumps({"applied": applied, "faults": faults() - start}))
"""


def _steps(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_kept_for_the_next_step_unless_the_environment_sets_malloc():
    """A block over glibc's mmap threshold was new memory at every step: mapped, faulted in
    page by page, unmapped when freed (a full softmax's training spent more than a third
    of its time in the kernel). Kept, the next steps take the same pages: no new faults."""
    clean = {k: None for k in os.environ
             if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "HIERTCN_MALLOC")}
    plain = _steps("plain", **clean)
    kept = _steps("keep", **clean)
    assert kept["applied"] is True
    assert plain["faults"] > 0 and kept["faults"] <= plain["faults"] // 10, (plain, kept)
    # the environment's own choice of malloc settings is left as it is
    for env in ({"HIERTCN_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                {"MALLOC_ARENA_MAX": "1"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        left = _steps("keep", **{**clean, **env})
        assert left["applied"] is False, env


# ... the same made and freed in another thread (TensorFlow's pool threads make the
# evaluation's [positions, V] score blocks), with one arena or the thread's own.
_THREAD_STEPS = """import json, resource, sys, threading
import numpy as np
from model import malloc
applied = malloc.keep_freed_memory(one_arena=sys.argv[1] == "one")
out = {}
def steps():
    a = np.ones(25_000_000, np.float32); del a
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        a = np.ones(25_000_000, np.float32); del a
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
t = threading.Thread(target=steps); t.start(); t.join()
print(json.dumps({"applied": applied, "faults": out["faults"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_one_arena_keeps_the_large_blocks_of_other_threads_too():
    """A block over 64 MB made in a thread other than the main one comes from that
    thread's arena, whose heaps hold 64 MB at most: mapped afresh each time however
    malloc's thresholds are set (model.evaluate at 164k items spent 30% of its CPU time in
    the kernel). With one arena for every thread (`model.evaluate`'s), it is kept."""
    clean = {k: None for k in os.environ
             if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "HIERTCN_MALLOC")}
    env = {k: v for k, v in {**os.environ, **clean}.items() if v is not None}
    runs = {}
    for mode in ("keep", "one"):
        proc = subprocess.run([sys.executable, "-c", _THREAD_STEPS, mode], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads(proc.stdout)
    assert runs["keep"]["applied"] is True and runs["one"]["applied"] is True
    assert runs["keep"]["faults"] > 0, runs
    assert runs["one"]["faults"] <= runs["keep"]["faults"] // 10, runs
