"""The gRPC client's command line without TensorFlow's runtime.

`tensorflow_serving.apis` imports TensorFlow's message modules (`tensorflow.core.framework.
tensor_pb2`, ...), and importing anything under `tensorflow` first runs TensorFlow's own
package init: 5-7 s and its native libraries, whose C++ side writes to the process's stderr
before Python's logging exists (absl's "All log messages before absl::InitializeLog() ..."
and, on a machine without CUDA, "Could not find cuda drivers"). `serving.client`'s command
line needs the messages only: `tensorflow_protos_only` lets them import on their own (about
0.3 s), and where that is not possible it imports TensorFlow with those lines held back
(`native_notes_dropped`), writing everything else (warnings, errors) through.
"""
from __future__ import annotations

import importlib.util
import sys
import types

from model.quiet import native_notes_dropped  # noqa: F401 - the client's import of it


def tensorflow_protos_only() -> bool:
    """Registers `tensorflow` as a bare package over its installed folder, so that its
    `*_pb2` message modules (whose folders have empty `__init__` files) import without
    TensorFlow's runtime. Only for a process that uses no TensorFlow op, such as the client
    command line; does nothing (returns False) when TensorFlow is already imported or not
    installed as a folder.

    Returns:
      True when the bare package is in place.
    """
    if "tensorflow" in sys.modules:
        return False
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = types.ModuleType("tensorflow", "TensorFlow's message modules only (serving.quiet)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__getattr__ = _not_loaded  # PEP 562: a clear error for tf.anything in this process
    sys.modules["tensorflow"] = package
    return True


def _not_loaded(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"tensorflow.{name}: this process loaded only TensorFlow's message "
                         "modules (serving.quiet.tensorflow_protos_only, the client command "
                         "line); import TensorFlow before serving.client runs as __main__")
