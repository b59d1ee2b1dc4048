"""glibc's malloc keeps freed large blocks in the commands that train and evaluate
(model.malloc)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes and frees a 100 MB array six times (a step's logits, as TensorFlow's allocator
# takes them from malloc), in the main thread or in another one (TensorFlow's ops run in
# its pool threads), and prints whether `keep_freed_memory` applied and the page faults of
# the last five.
_STEPS = """import json, resource, sys, threading
import numpy as np
from model import malloc
if sys.argv[1] == "keep-many-cpus":  # (a machine of more CPUs than one arena is for)
    malloc.ONE_ARENA_MAX_CPUS = malloc.usable_cpus() - 1
applied = (malloc.keep_freed_memory(one_arena=True if sys.argv[1] == "keep1" else None)
           if sys.argv[1].startswith("keep") else None)
out = {"applied": applied, "cpus": malloc.usable_cpus()}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def steps():
    a = np.ones(25_000_000, np.float32); del a
    start = faults()
    for _ in range(5):
        a = np.ones(25_000_000, np.float32); del a
    out["faults"] = faults() - start
if sys.argv[2] == "thread":
    t = threading.Thread(target=steps); t.start(); t.join()
else:
    steps()
print(json.dumps(out))
"""


def _steps(mode: str, where: str = "main", **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", _STEPS, mode, where], cwd=REPO,
                          capture_output=True,
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
    plain = _steps("plain", "main", **clean)
    kept = _steps("keep", "main", **clean)
    assert kept["applied"] is True
    assert plain["faults"] > 0 and kept["faults"] <= plain["faults"] // 10, (plain, kept)
    # In a thread of its own (whose glibc arena grows in heaps of at most 64 MB) the block
    # was mapped afresh with M_MMAP_MAX 0 and the trim threshold alone, as set until
    # 2026-12-07 (here from the environment): one arena keeps it too. One arena is the
    # default on a machine of at most ONE_ARENA_MAX_CPUS CPUs (this suite's 2-core CI).
    plain = _steps("plain", "thread", **clean)
    old = _steps("plain", "thread", **clean, MALLOC_MMAP_MAX_="0",
                 MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    one = _steps("keep1", "thread", **clean)
    assert one["applied"] is True
    assert plain["faults"] > 0 and old["faults"] > 10 * max(one["faults"], 1), (plain, old, one)
    auto = _steps("keep", "thread", **clean)
    if auto["cpus"] <= malloc.ONE_ARENA_MAX_CPUS:
        assert auto["faults"] <= plain["faults"] // 10, (plain, auto)
    # with more CPUs the arenas are as glibc makes them (their locks are not one for every
    # thread): the block in a thread is mapped afresh again
    many = _steps("keep-many-cpus", "thread", **clean)
    assert many["applied"] is True and many["faults"] > 10 * max(one["faults"], 1), (many, one)
    # the environment's own choice of malloc settings is left as it is
    for env in ({"HIERTCN_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                {"MALLOC_ARENA_MAX": "4"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        left = _steps("keep", **{**clean, **env})
        assert left["applied"] is False, env
