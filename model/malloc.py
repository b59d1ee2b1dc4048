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
(mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD its maximum), and, on a machine of at most
`ONE_ARENA_MAX_CPUS` CPUs, from one arena, the main one (M_ARENA_MAX 1): a thread's own
arena grows in heaps of at most 64 MB, so a larger block made in one of TensorFlow's pool
threads (Keras's Adam over a 500,000-item table: its 256 MB slot updates) was mapped
afresh every step whatever M_MMAP_MAX says; on the main arena's heap it is kept too
(`train_speed.py`'s Keras-Adam setting on 2 cores: 620 -> 1,821 events/s, system time
32.0 -> 5.3 s; docs/performance.md). With more CPUs, more threads would wait on that one
arena's lock (Hadoop's MALLOC_ARENA_MAX=4 slowed TensorFlow's training threefold: TonY
issue 346), which was not measured here, so their arenas are left as glibc makes them.
The process's memory stays at its peak,
which a training or an evaluation reaches in its first steps. The commands that train and
evaluate call it, before TensorFlow starts its threads; a library user's process is left
as it is.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# HIERTCN_MALLOC=system: leave malloc as the environment has it
ENV = "HIERTCN_MALLOC"
# one arena up to this many usable CPUs (measured on 2: level or faster, and Keras's Adam
# over 500,000 items 2.9x; see the module docstring for more)
ONE_ARENA_MAX_CPUS = 2


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def own_settings() -> bool:
    """Whether the environment sets malloc itself: glibc's MALLOC_..._ variables (and
    MALLOC_ARENA_MAX, MALLOC_ARENA_TEST) or its malloc tunables, or HIERTCN_MALLOC=system."""
    return (os.environ.get(ENV, "").strip().lower() == "system"
            or any(k.startswith("MALLOC_") and (k.endswith("_") or k.startswith("MALLOC_ARENA_"))
                   for k in os.environ)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(one_arena: bool | None = None) -> bool:
    """Makes this process's glibc malloc keep freed blocks for the next ones instead of
    mapping and unmapping each large one, with `one_arena` in every thread too (None: where
    the process has at most `ONE_ARENA_MAX_CPUS` CPUs; see the module docstring); call it
    before the process starts threads that allocate. Returns whether it
    did: not off Linux's glibc (musl's mallopt does nothing; an allocator preloaded in its
    place ignores glibc's settings), nor where the environment sets malloc itself
    (`own_settings`)."""
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
    kept = all([mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 2**31 - 1)])
    if one_arena is None:
        one_arena = usable_cpus() <= ONE_ARENA_MAX_CPUS
    # (M_ARENA_MAX counts when a thread first needs an arena: before TensorFlow's threads)
    return bool(mallopt(M_ARENA_MAX, 1)) and kept if one_arena else kept
