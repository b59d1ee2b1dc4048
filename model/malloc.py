"""glibc's malloc set up for a process that makes and frees large tensors every step.

TensorFlow's CPU allocator takes its buffers from malloc. glibc serves a block above its
mmap threshold (which grows with the blocks freed, to 32 MB at most) from a fresh mmap and
returns it to the kernel when it is freed, so a tensor over 32 MB made at every step (a
full softmax's [B·L, V] logits and their gradient: 196 MB each at B·L = 6,400 positions
and 7,689 items) is new memory every step, which the kernel maps and zero-fills page by
page. Measured on a 2-core VM, 150 training steps on a Taobao-like log (7,689 items, the
defaults): 51.1-53.0 s, with 36 s of system CPU time and 12.3 million page faults; with
the freed blocks kept, 30.2-36.1 s, 2.6-2.9 s and 0.2 million, at a peak RSS of
1,037-1,097 MB against 936-937 (docs/performance.md, 2026-12-07).

`keep_freed_memory` has glibc serve every block from its heap and keep what is freed there
(mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD its maximum): the process's memory stays at its
peak, which a training or an evaluation reaches in its first steps. The commands that
train and evaluate call it; a library user's process is left as it is. (A block over 64 MB
made in another thread's arena, whose heaps hold 64 MB at most, is still mapped afresh
every step: Keras's Adam over `train_speed.py`'s 500,000-item table, 620 events/s. One
arena for every thread (M_ARENA_MAX 1) keeps those too, 1,821 events/s, but costs the
default path 14% on 2 quiet cores, its lock contended (sampled HierTCN, four pairs in
turn: median 41k against 47.6k events/s; docs/performance.md, 2026-12-07), so it is not
set here; `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` in the
environment sets all three for such a run.) `model.evaluate` has no training steps to pay
for the lock, and ranks each event against the whole catalogue in [positions, V] blocks
of up to 128 MB made in those threads: it sets one arena as well (`one_arena`). On a
2-core VM, 2026-12-07, two pairs each: 1,000 valid users of a 164k-item log 42.7 / 40.1 s
against 33.7 / 31.2 s with one arena (18.0 / 15.5 s of system CPU time against 2.4 /
2.3), 100 users of a 41k-item log 57.6 / 50.1 s against 42.9 / 45.8 s, a 7.7k-item log's
20,000 users 17.8 / 14.8 s against 16.4 / 17.2 s (no difference beyond the VM's spread).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# HIERTCN_MALLOC=system: leave malloc as the environment has it
ENV = "HIERTCN_MALLOC"


def own_settings() -> bool:
    """Whether the environment sets malloc itself: glibc's MALLOC_..._ variables (and
    MALLOC_ARENA_MAX, MALLOC_ARENA_TEST) or its malloc tunables, or HIERTCN_MALLOC=system."""
    return (os.environ.get(ENV, "").strip().lower() == "system"
            or any(k.startswith("MALLOC_") and (k.endswith("_") or k.startswith("MALLOC_ARENA_"))
                   for k in os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Makes this process's glibc malloc keep freed blocks for the next ones instead of
    mapping and unmapping each large one (see the module docstring); with `one_arena`,
    every thread's blocks too (all threads share one arena: call it before the threads
    are made, i.e. before TensorFlow runs an op). Returns whether it did: not off Linux's
    glibc (musl's mallopt does nothing; an allocator preloaded in its place ignores
    glibc's settings), nor where the environment sets malloc itself (`own_settings`)."""
    if not sys.platform.startswith("linux") or own_settings():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # (glibc's own: absent from musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
            and (not one_arena or bool(mallopt(M_ARENA_MAX, 1))))
