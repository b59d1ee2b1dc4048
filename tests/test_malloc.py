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
