"""Shared pieces of the serving tests: a tiny real HierTCN, its vocabulary, a server process."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import serving  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow is imported
import tensorflow as tf

from model import registry
from model.config import HierTCNConfig
from pipeline import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The published model (exports with the repeat head are tested with TINY.replace(...)).
TINY = HierTCNConfig(embedding_dim=8, gru_units=4, gru_layers=2, channels=8, kernel_size=2,
                     num_blocks=2, repeat_head=False)
READY = re.compile(r"^serving (\S+) version (\d+) on (\S+):(\d+)$")


def tiny_vocabulary(num_items: int = 12) -> schema.Vocabulary:
    """[PAD], [UNK], item0 .. item{n-1}."""
    ids = (schema.PAD_TOKEN, schema.UNKNOWN_TOKEN) + tuple(f"item{i}" for i in range(num_items))
    return schema.Vocabulary(ids=ids, counts=np.zeros(len(ids), np.int64))


def tiny_model(vocabulary: schema.Vocabulary, seed: int = 0, **config):
    """A randomly initialised HierTCN with tiny dims (state H = 8, D = 8); `config`
    overrides TINY's fields."""
    tf.keras.utils.set_random_seed(seed)
    return registry.build_model("hiertcn", TINY.replace(config), vocabulary.size)


class ServerProcess:
    """`python -m serving.server` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, base_path: str, model_name: str, *extra: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--model-base-path", base_path,
             "--model-name", model_name, "--port", "0", "--poll-seconds", "0.2", *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready: queue.Queue[int] = queue.Queue()
        self.target = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = READY.match(line)
            if m:
                self.target = f"{m.group(3)}:{m.group(4)}"
                self._ready.put(int(m.group(2)))

    def wait_version(self, version: int, timeout: float = 120.0) -> None:
        """Blocks until the server announces `version` as its newest."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._ready.get(timeout=0.5) == version:
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"server did not serve version {version}:\n"
                             + "\n".join(self.lines[-30:]))

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
