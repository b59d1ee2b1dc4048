"""Exports a trained model as a TF Serving SavedModel version (README § 3. Serving).

`python -m serving.export --model-dir RUN --export-base EXPORT [--version N]` writes
`EXPORT/<version>/` with five signatures over raw string item ids:

* `update_state`: `user_state` float32 [B, H], `session_items` string [B, T]
  → `user_state` float32 [B, H] (the high-level GRU step after a session).
* `next_items` (also `serving_default`): `user_state`, `session_items`,
  `history_items` string [B, N], `k` int32 [] or [B] (every row gets the largest)
  → `item_ids` string [B, k'], `scores` float32 [B, k'] with k' = min(k, catalogue size).
* `user_embedding`: `user_state`, `session_items`, `history_items`
  → `embedding` float32 [B, D].
* `known_items`: `items` string [B, T] → `known` bool [B, T], whether each id is in this
  version's catalogue (padding and unknown ids: false). The user-state store keeps the
  newest `history_size` known ids with the unknown ones among them, as the repeat head
  reads the history (`serving.state_store.trim_sessions`).
* `item_vectors`: `items` string [B] → `vectors` float32 [B, D], `bias` float32 [B], the
  output layer's rows: without a repeat head, an item's `next_items` score is
  embedding . vector + bias, for an external nearest-neighbour index (an id not in the
  catalogue gets zeros).

Every signature refuses a `user_state` holding NaN or infinite values (INVALID_ARGUMENT),
and reads `session_items` with immediate repeats collapsed, as the pipeline writes every
split (`collapses_repeats`: not for a model trained with `--keep-current`).

The vocabulary travels as an asset (`assets/item_ids.txt`, line n = index n); the empty
string pads and an unknown id maps to the unknown index. The export is written to a hidden
temporary folder and renamed into place, so TF Serving never sees a half-written version.
"""
from __future__ import annotations

if __name__ == "__main__":
    import sys

    from model import quiet
    from pipeline import argtypes

    # a summary that cannot be printed (a full disk under `> log`) is said at the end, not
    # a traceback after the version was published
    argtypes.survive_closed_output()
    from serving import cli

    # a usage error, --help or a missing run folder at once, before TensorFlow loads
    _error = cli.export_error(cli.export_args(sys.argv[1:]))
    if _error:
        print(f"error: {_error}", file=sys.stderr)
        sys.exit(2)
    _INTERRUPTED = "interrupted: no version was published"
    argtypes.interrupts_in_one_line(_INTERRUPTED)
    argtypes.sigterm_until_handled()  # (TensorFlow's import: seconds)
    quiet.import_tensorflow(keras=True)  # its start-up notes held back where they are noise

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import types
from typing import Any, Collection, Sequence

try:
    import fcntl
except ImportError:  # Windows: abandoned temporaries are not removed
    fcntl = None

import numpy as np
import tensorflow as tf

from model import processes
import pipeline
from pipeline import argtypes, schema, storage
from serving import cli, protos

VOCAB_ASSET = "item_ids.txt"
WARMUP_FILE = "tf_serving_warmup_requests"
CONFIG_FILE = "export_config.json"
# The export's format, recorded in export_config.json (1 for exports without it): raised
# whenever a change to the serving graph, its signatures or assets makes an export of the
# same weights serve otherwise, so that exporting an unchanged run after an upgrade
# publishes a new version (it said "nothing exported" and kept the older graph). 2: known_items,
# repeats collapsed in the graph, ids stripped, request bounds (2026-12-04/05) and after.
# 3: item_vectors (2026-12-06). 4: a repeat head's scores exact where the current item or
# the seen items are all but certain, with a seen bias past 88, and with a repeat part
# below e^-87 (2026-12-06).
EXPORT_FORMAT = 4
ASSETS_EXTRA = "assets.extra"

SIG_UPDATE_STATE = "update_state"
SIG_NEXT_ITEMS = "next_items"
SIG_USER_EMBEDDING = "user_embedding"
SIG_KNOWN_ITEMS = "known_items"
SIG_ITEM_VECTORS = "item_vectors"
SIG_DEFAULT = "serving_default"

USER_STATE = "user_state"
SESSION_ITEMS = "session_items"
HISTORY_ITEMS = "history_items"
K = "k"
ITEM_IDS = "item_ids"
SCORES = "scores"
EMBEDDING = "embedding"
ITEMS = "items"
KNOWN = "known"
VECTORS = "vectors"
BIAS = "bias"

# Name of the model method that scores with the user's history (every SequenceModel has
# it; a model without a repeat head ignores the history).
HISTORY_SCORER = "item_scores_with_history"
# Python's `str.isspace()` characters (the pipeline's `str.strip()` takes them off an id's
# ends) as an RE2 class: ASCII whitespace, the information separators \x1c-\x1f, NEL and
# Unicode's separators (\p{Z}: no-break and ideographic spaces, line and paragraph seps).
_WHITESPACE = r"[\t\n\x0b\f\r\x1c-\x1f\x{85}\p{Z}]"
STRIP_PATTERN = rf"^{_WHITESPACE}+|{_WHITESPACE}+$"


class ExportError(ValueError):
    """An export that cannot be written (bad folder, version clash, bad vocabulary)."""


class ServingModule(tf.Module):
    """The serving graph: string ids ↔ indices around the model's own methods.

    Only the model's variables are tracked (not the Keras object), so the SavedModel holds
    exactly the weights and the three signature functions; nothing writes a variable.
    """

    def __init__(self, model: Any, vocab_file: str, vocab_size: int,
                 collapse: bool | None = None):
        """Builds the lookup tables and the signature functions.

        Args:
          model: a built `model.sequence_model.SequenceModel` (`state_size`,
            `update_state`, `last_user_embedding`, `item_logits`, and
            `item_scores_with_history(user [B, D], history int64 [B, N], state [B, H],
            current int64 [B]) -> [B, V]`, which `next_items` uses with the
            `history_items` input, followed by the session so far, and the session's last
            item when the model's `history_size` > 0 (else None); a duck-typed
            model without that method is scored with `item_logits`).
          vocab_file: one raw id per line, line n = index n (rows 0 and 1 reserved).
          vocab_size: number of lines of `vocab_file` (the model's output width).
          collapse: whether sessions' immediate repeats are collapsed (None:
            `collapses_repeats(model)`).
        """
        super().__init__(name="hiertcn_serving")
        from model import layers

        # The output layers score with a [D, V] copy of W (`ItemScorer.transposed_copy`),
        # which replaces W [V, D] in the SavedModel (the same bytes, read faster); the
        # functions are traced, and saved, in `serving_layout` (`save`).
        layouts = []
        for layer in getattr(model, "submodules", ()):
            copy = layer.transposed_copy() if isinstance(layer, layers.ItemScorer) else None
            if copy is not None:
                layouts.append((layer, copy))
        # (not a list attribute: the module would track the layers, and save W with them)
        self._layouts = types.SimpleNamespace(pairs=tuple(layouts))
        replaced = {layer.kernel.ref() for layer, _ in layouts}
        self.model_variables = ([v for v in model.variables if v.ref() not in replaced]
                                + [copy for _, copy in layouts])
        self._build(model, vocab_file, vocab_size,
                    collapses_repeats(model) if collapse is None else collapse)

    @contextlib.contextmanager
    def serving_layout(self):
        """The model's output layers score with the module's copies of their weights
        (tracing the signatures inside reads those, not the model's own)."""
        with contextlib.ExitStack() as stack:
            for layer, copy in self._layouts.pairs:
                stack.enter_context(layer.serving_layout(copy))
            yield

    def save(self, path: str) -> None:
        """`tf.saved_model.save` with the signatures (which saving traces again)."""
        with self.serving_layout():
            tf.saved_model.save(self, path, signatures=self.signatures())

    def _build(self, model: Any, vocab_file: str, vocab_size: int, collapse: bool) -> None:
        """The lookup tables and the signature functions (see `__init__`)."""
        self.vocab_asset = tf.saved_model.Asset(vocab_file)
        self.id_to_index = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                self.vocab_asset, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, vocab_size=vocab_size),
            default_value=schema.UNKNOWN_INDEX)
        self.index_to_id = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                self.vocab_asset, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, vocab_size=vocab_size),
            default_value=schema.SERVING_PAD_ID)
        h = int(model.state_size)
        state_spec = tf.TensorSpec([None, h], tf.float32, name=USER_STATE)
        session_spec = tf.TensorSpec([None, None], tf.string, name=SESSION_ITEMS)
        history_spec = tf.TensorSpec([None, None], tf.string, name=HISTORY_ITEMS)
        # k: a scalar, or one value per row ([B]: TF Serving's --enable_batching needs a
        # batch dimension on every input and concatenates them); the rows get the largest.
        k_spec = tf.TensorSpec(None, tf.int32, name=K)
        use_history = callable(getattr(model, HISTORY_SCORER, None))
        # A session-only model's scores before a session's first item are popularity's, as
        # `model.evaluate` ranks first items (DESIGN §6; `KerasScorer`, for a model without
        # a repeat head), not its start vector's: what is served is what was measured.
        first = getattr(model, "first_item_scores", None)
        first = (None if first is None or getattr(model, "history_size", 0)
                 else tf.constant(first, tf.float32))

        def canonical(ids):
            """Ids as the pipeline writes them (its `str.strip()`): whitespace at either
            end taken off, but for an id of whitespace only (an unknown item, not the
            padding "")."""
            stripped = tf.strings.regex_replace(ids, STRIP_PATTERN, "")
            return tf.where(tf.equal(stripped, ""), ids, stripped)

        def lookup(ids):
            return lookup_canonical(canonical(ids))

        def lookup_canonical(ids):
            # "" pads; any other id not in the catalogue (the reserved rows' tokens
            # included) is unknown
            index = self.id_to_index.lookup(ids)
            index = tf.where(index == schema.PAD_INDEX,
                             tf.constant(schema.UNKNOWN_INDEX, tf.int64), index)
            return tf.where(tf.equal(ids, schema.SERVING_PAD_ID),
                            tf.constant(schema.PAD_INDEX, tf.int64), index)

        def session(ids):
            """A session's indices, its items moved to the front in order (padding may
            be anywhere in the request; the model reads a session's items from the
            start), an id equal to the one before it left out as the pipeline does
            (`collapses_repeats`; a reload, a double click), and at least one column
            wide."""
            ids = canonical(ids)
            if collapse:
                # the raw ids (two unknown ones are two items), padding out of the way
                order = tf.argsort(tf.cast(tf.equal(ids, schema.SERVING_PAD_ID), tf.int32),
                                   axis=1, stable=True)
                ids = tf.gather(ids, order, batch_dims=1)
                # ("[UNK]", an unknown item whose raw id a data folder lost, as
                # serving.backfill stores it: two of them are two items, as the
                # records hold them; no log's item is called so, the pipeline refuses it)
                repeat = tf.logical_and(
                    tf.equal(ids[:, 1:], ids[:, :-1]),
                    tf.logical_and(tf.not_equal(ids[:, 1:], schema.SERVING_PAD_ID),
                                   tf.not_equal(ids[:, 1:], schema.UNKNOWN_TOKEN)))
                repeat = tf.concat([tf.zeros_like(ids[:, :1], tf.bool), repeat], axis=1)
                ids = tf.where(repeat, tf.constant(schema.SERVING_PAD_ID), ids)
            items = lookup_canonical(ids)
            order = tf.argsort(tf.cast(items == schema.PAD_INDEX, tf.int32), axis=1,
                               stable=True)
            items = tf.gather(items, order, batch_dims=1)
            return tf.pad(items, [[0, 0], [0, tf.maximum(1 - tf.shape(items)[1], 0)]])

        def one_row_at_least(*tensors):
            """The tensors with a row of padding when the batch is empty (TF's Conv1D,
            in the model's TCN blocks, refuses a batch of 0 rows), and the batch size to
            cut the outputs back to."""
            rows = tf.shape(tensors[0])[0]
            extra = tf.maximum(1 - rows, 0)
            return rows, [tf.pad(t, [[0, extra], [0, 0]]) for t in tensors]

        def input_checks(user_state, **items):
            """The state has this export's width (TF Serving does not check a request's
            shapes against the signature: a state of another width would be read wrong or
            fail deep in the model), the batch sizes agree (`items`: input name ->
            tensor), and the state is finite (a NaN state, a damaged store's, would answer
            NaN scores and stay NaN)."""
            return [tf.debugging.assert_equal(
                        tf.shape(user_state)[1], h, message=(
                            f"{USER_STATE} must have {h} columns, this export's state width "
                            "(a state written by another model or version? start the user "
                            "from a zero state, or rebuild it from the user's sessions)"))] + [
                    tf.debugging.assert_equal(
                        tf.shape(user_state)[0], tf.shape(x)[0],
                        message=f"{USER_STATE} and {name} must have the same batch size")
                    for name, x in items.items()] + [tf.debugging.assert_all_finite(
                        user_state, f"{USER_STATE} holds NaN or infinite values: send the "
                        "user's state again from its sessions, or a zero state")]

        def update_state(user_state, session_items):
            checks = input_checks(user_state, **{SESSION_ITEMS: session_items})
            with tf.control_dependencies(checks):
                items = session(session_items)
            return {USER_STATE: tf.cast(model.update_state(user_state, items), tf.float32)}

        def user_embedding(user_state, session_items, history_items):
            del history_items  # accepted by every export; the embedding does not use it
            checks = input_checks(user_state, **{SESSION_ITEMS: session_items})
            with tf.control_dependencies(checks):
                items = session(session_items)
            rows, (user_state, items) = one_row_at_least(user_state, items)
            return {EMBEDDING: tf.cast(model.last_user_embedding(user_state, items)[:rows],
                                       tf.float32)}

        def next_items(user_state, session_items, history_items, k):
            ks = tf.reshape(k, [-1])
            one_or_per_row = tf.logical_and(tf.rank(k) <= 1, tf.logical_or(
                tf.equal(tf.size(k), 1), tf.equal(tf.size(k), tf.shape(user_state)[0])))
            checks = [*input_checks(user_state, **{SESSION_ITEMS: session_items,
                                                    HISTORY_ITEMS: history_items}),
                      tf.debugging.assert_equal(one_or_per_row, True, message=(
                          f"{K} must be a scalar or one value per row of {USER_STATE} ([B])")),
                      tf.debugging.assert_non_negative(ks, message=f"{K} must be >= 0")]
            with tf.control_dependencies(checks):
                items = session(session_items)
                k = tf.reduce_max(tf.concat([ks, [0]], axis=0))
                history = [lookup(history_items)] if use_history else []
            rows, (user_state, items, *history) = one_row_at_least(user_state, items, *history)
            u = model.last_user_embedding(user_state, items)
            if use_history:
                history = history[0]
                current = None
                if getattr(model, "history_size", 0):  # a repeat head also points at the session
                    history = tf.concat([history, items], axis=1)
                    # the session's last item (padding after it; 0 for an empty session)
                    length = tf.reduce_sum(tf.cast(items > 0, tf.int32), axis=1)
                    current = tf.gather(tf.pad(items, [[0, 0], [1, 0]]), length, batch_dims=1)
                scores = getattr(model, HISTORY_SCORER)(u, history, user_state, current)
            else:
                scores = model.item_logits(u)
            scores = tf.cast(scores, tf.float32)
            if first is not None:  # an empty session: the first item's (popularity) scores
                empty = tf.reduce_all(tf.equal(items, schema.PAD_INDEX), axis=1)
                scores = tf.where(empty[:, None], first[None, :], scores)
            # Columns 0 (padding) and 1 (unknown) are cut off, so they are never returned.
            real = scores[:rows, schema.NUM_RESERVED:]
            top = tf.math.top_k(real, k=tf.minimum(k, tf.shape(real)[1]))
            ids = self.index_to_id.lookup(tf.cast(top.indices, tf.int64) + schema.NUM_RESERVED)
            return {ITEM_IDS: ids, SCORES: top.values}

        def known_items(items):
            return {KNOWN: lookup(items) >= schema.NUM_RESERVED}

        self.known_items = tf.function(known_items, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.string, name=ITEMS)])

        def item_vectors(items):
            """The output layer's rows of the items: `next_items`' score of an item,
            without a repeat head, is embedding . vector + bias (`user_embedding`), what an
            external nearest-neighbour index needs (but for a session-only model's empty
            session, scored by popularity); an id not in the catalogue (padding too) gets
            zeros."""
            index = lookup(items)
            known = index >= schema.NUM_RESERVED
            vectors, bias = model.output_rows(tf.where(known, index, 0))
            return {VECTORS: tf.where(known[:, None], vectors, 0.0),
                    BIAS: tf.where(known, bias, 0.0)}

        self.item_vectors = None
        if callable(getattr(model, "output_rows", None)):
            self.item_vectors = tf.function(item_vectors, autograph=False, input_signature=[
                tf.TensorSpec([None], tf.string, name=ITEMS)])
        self.update_state = tf.function(update_state, autograph=False, input_signature=[state_spec, session_spec])
        self.user_embedding = tf.function(
            user_embedding, autograph=False, input_signature=[state_spec, session_spec, history_spec])
        self.next_items = tf.function(
            next_items, autograph=False, input_signature=[state_spec, session_spec, history_spec, k_spec])

    def signatures(self) -> dict[str, Any]:
        """The signature map for `tf.saved_model.save`."""
        next_items = self.next_items.get_concrete_function()
        return {
            SIG_DEFAULT: next_items,
            SIG_NEXT_ITEMS: next_items,
            SIG_UPDATE_STATE: self.update_state.get_concrete_function(),
            SIG_USER_EMBEDDING: self.user_embedding.get_concrete_function(),
            SIG_KNOWN_ITEMS: self.known_items.get_concrete_function(),
            **({SIG_ITEM_VECTORS: self.item_vectors.get_concrete_function()}
               if self.item_vectors is not None else {}),
        }


def collapses_repeats(model: Any) -> bool:
    """Whether the export collapses immediate repeats in a session, as the pipeline does
    for every split: yes, unless the model was trained on records that keep them
    (HierTCN with `exclude_current` off, `model.train --keep-current`; any other model
    trained on such records: `serving.export --keep-repeats`)."""
    return bool(getattr(getattr(model, "config", None), "exclude_current", True))


def checkpoint_digest(checkpoint: str) -> str | None:
    """SHA-256 of a checkpoint's `.index` file (its tensors' shapes and checksums): the same
    digest, the same weights. None where it cannot be read."""
    try:
        with open(checkpoint + ".index", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def weights_digest(checkpoint: str) -> str | None:
    """SHA-256 of the model's weights in a checkpoint (names, dtypes, shapes and values of
    the `model/` variables; not the optimizer's slots or the training state, which only the
    periodic checkpoints hold): a run's best and latest checkpoints of one step have the
    same digest, where their `.index` files differ. None where it cannot be read."""
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        digest = hashlib.sha256()
        for name in sorted(reader.get_variable_to_dtype_map()):
            if not name.startswith("model/") or ".OPTIMIZER_SLOT" in name:
                continue
            value = np.ascontiguousarray(reader.get_tensor(name))
            digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
            digest.update(value.tobytes())
        return digest.hexdigest()
    except (tf.errors.OpError, ValueError, OSError):
        return None


def newest_with(export_base: str, source: dict) -> tuple[int | None, int | None]:
    """(the newest version under `export_base` when it was exported from the same weights
    as `source` (`weights_digest`; `checkpoint_digest` for a version exported before that
    was recorded) in this version's `EXPORT_FORMAT`, else None; that version when it holds
    the same weights in an older format, which a new export replaces, else None)."""
    newest = next_version(export_base) - 1
    if not newest:
        return None, None
    path = os.path.join(export_base, str(newest), ASSETS_EXTRA, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        old = written.get("source", {})
    except (OSError, ValueError, AttributeError):
        return None, None
    key = "weights_digest" if old.get("weights_digest") else "checkpoint_digest"
    same = (source.get(key) and old.get(key) == source[key]
            and bool(old.get("keep_repeats")) == bool(source.get("keep_repeats")))
    if not same:
        return None, None
    if written.get("export_format", 1) != EXPORT_FORMAT:
        return None, newest
    return newest, None


def version_number(name: str) -> int | None:
    """The version a folder name stands for, as TF Serving reads it: ASCII digits whose
    value fits an int64 (`007` is 7); None for any other name."""
    if not (name.isascii() and name.isdigit()):
        return None
    number = int(name)
    return number if number <= protos.MAX_VERSION else None


def next_version(export_base: str) -> int:
    """1 + the largest integer version folder under `export_base` (1 when none)."""
    if not os.path.isdir(export_base):
        return 1
    versions = [version_number(n) for n in os.listdir(export_base)]
    return max([v for v in versions if v is not None], default=0) + 1


def write_vocabulary_asset(path: str, vocabulary: schema.Vocabulary) -> None:
    """Writes the raw ids one per line (line n = index n).

    Raises:
      ExportError: an id contains a line break or is empty, is one of the reserved rows'
        tokens or appears twice (it could not round-trip).
    """
    seen: dict[str, int] = {}
    for i, item in enumerate(vocabulary.ids):
        if not item or "\n" in item or "\r" in item:
            raise ExportError(f"vocabulary index {i}: item id {item!r} is empty or has a line "
                              "break; fix the raw ids before running the pipeline")
        if item in seen:
            raise ExportError(f"vocabulary indices {seen[item]} and {i} have the same item id "
                              f"{item!r} (ids {schema.PAD_TOKEN} and {schema.UNKNOWN_TOKEN} are "
                              "reserved); rerun the pipeline, which rejects such ids")
        seen[item] = i
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(vocabulary.ids) + "\n")


def warmup_requests(vocabulary: schema.Vocabulary, state_size: int,
                    model_name: str = "hiertcn",
                    signatures: Collection[str] | None = None) -> list[bytes]:
    """One serialized `PredictionLog` per signature (of `signatures`; None: all), batch 1,
    for TF Serving's warm-up."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    item = vocabulary.ids[schema.NUM_RESERVED] if vocabulary.num_items else schema.SERVING_PAD_ID
    state = tf.make_tensor_proto(np.zeros([1, state_size], np.float32))
    session = tf.make_tensor_proto(np.array([[item, schema.SERVING_PAD_ID]], dtype=object))
    history = tf.make_tensor_proto(np.array([[item]], dtype=object))
    # k with the batch dimension: TF Serving runs warm-up through its batching session when
    # --enable_batching is on, which refuses a scalar input (the version would not load)
    k = tf.make_tensor_proto(np.array([min(10, vocabulary.num_items)], np.int32))
    inputs = {
        SIG_UPDATE_STATE: {USER_STATE: state, SESSION_ITEMS: session},
        SIG_NEXT_ITEMS: {USER_STATE: state, SESSION_ITEMS: session, HISTORY_ITEMS: history, K: k},
        SIG_USER_EMBEDDING: {USER_STATE: state, SESSION_ITEMS: session, HISTORY_ITEMS: history},
        SIG_KNOWN_ITEMS: {ITEMS: session},
        SIG_ITEM_VECTORS: {ITEMS: tf.make_tensor_proto(np.array([item], dtype=object))},
    }
    records = []
    for signature, tensors in inputs.items():
        if signatures is not None and signature not in signatures:
            continue
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        for key, proto in tensors.items():
            request.inputs[key].CopyFrom(proto)
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def _config_dict(config: Any) -> Any:
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return config if isinstance(config, (dict, list, str, int, float, type(None))) else repr(config)


def export_model(model: Any, vocabulary: schema.Vocabulary, export_base: str,
                 version: int | None = None, config: Any = None,
                 source: dict | None = None, collapse: bool | None = None) -> str:
    """Writes one SavedModel version atomically.

    Args:
      model: a built model with the serving methods (see `ServingModule`).
      vocabulary: the model's vocabulary (`items.tsv`).
      export_base: the folder TF Serving watches (`--model_base_path`).
      version: the version number; default 1 + the largest existing one.
      config: the model's resolved config, stored in `assets.extra/export_config.json`.
      source: where the weights come from (run folder, checkpoint), stored there too.
      collapse: whether the signatures collapse a session's immediate repeats (None:
        `collapses_repeats(model)`).

    Returns:
      The path of the version folder.

    Raises:
      ExportError: the version exists already, is not positive, or the vocabulary does
        not match the model.
    """
    chosen = version is None
    version = next_version(export_base) if chosen else int(version)
    if not 1 <= version <= protos.MAX_VERSION:
        raise ExportError(f"--version must be a positive integer up to {protos.MAX_VERSION} (TF "
                          f"Serving's versions are int64), got {version}")
    final = os.path.join(export_base, str(version))
    if os.path.exists(final):
        raise ExportError(f"{final} already exists: pass another --version or omit it to "
                          f"use the next one ({next_version(export_base)})")
    os.makedirs(export_base, exist_ok=True)
    remove_abandoned_temporaries(export_base)
    # Hidden, non-integer name: TF Serving and serving.server ignore it until the rename.
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-{_HOST}-{os.getpid()}-", dir=export_base)
    lock = None
    try:
        lock = _hold_lock(tmp)  # while held, no other export takes this folder for abandoned
        scratch = os.path.join(tmp, "_scratch")
        os.makedirs(scratch)
        vocab_file = os.path.join(scratch, VOCAB_ASSET)
        write_vocabulary_asset(vocab_file, vocabulary)
        collapse = collapses_repeats(model) if collapse is None else collapse
        module = ServingModule(model, vocab_file, vocabulary.size, collapse)
        out = os.path.join(tmp, "model")
        module.save(out)
        extra = os.path.join(out, ASSETS_EXTRA)
        os.makedirs(extra)
        with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
            for record in warmup_requests(vocabulary, int(model.state_size), signatures=None
                                          if module.item_vectors is not None else
                                          {SIG_UPDATE_STATE, SIG_NEXT_ITEMS,
                                           SIG_USER_EMBEDDING, SIG_KNOWN_ITEMS}):
                writer.write(record)
        with open(os.path.join(extra, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"version": version, "state_size": int(model.state_size),
                       "vocabulary_size": vocabulary.size,
                       "collapses_repeats": collapse,
                       "config": _config_dict(config),
                       "source": source or {},
                       "code_version": pipeline.__version__,
                       "export_format": EXPORT_FORMAT,
                       "tensorflow_version": tf.__version__}, f, indent=2, default=str)
        _check_whole(out, vocabulary.size)
        _sync_tree(out)  # on disk before the rename publishes it (a power cut, an OS crash)
        while True:
            try:
                # a stop signal waits until the rename is recorded: what an interrupt says
                # follows PUBLISHED
                with argtypes.stop_signals_held():
                    os.rename(out, final)
                    PUBLISHED.append(final)
                _sync_dir(export_base)
                break
            except OSError:
                if not os.path.exists(final):
                    raise
                # another export took this version meanwhile
                if not chosen:
                    raise ExportError(f"{final} was written by another export meanwhile: pass "
                                      "another --version or omit it") from None
                version = next_version(export_base)
                final = os.path.join(export_base, str(version))
                _set_version(os.path.join(extra, CONFIG_FILE), version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return final


def _check_whole(out: str, vocab_size: int) -> None:
    """Raises ExportError unless `out` holds a whole SavedModel: its graph, its variables'
    index and the vocabulary asset of `vocab_size` lines. (The temporary folder removed
    while TensorFlow saved into it, which recreates the folders it writes, published a
    version without its vocabulary: TensorFlow could not load it.)"""
    asset = os.path.join(out, "assets", VOCAB_ASSET)
    missing = [p for p in ("saved_model.pb", os.path.join("variables", "variables.index"),
                           os.path.join("assets", VOCAB_ASSET))
               if not os.path.isfile(os.path.join(out, p))]
    lines = None
    if not missing:
        with open(asset, "rb") as f:
            lines = sum(1 for _ in f)
    if missing or lines != vocab_size:
        what = (f"{', '.join(missing)} missing" if missing
                else f"{VOCAB_ASSET} has {lines} lines, not {vocab_size}")
        raise ExportError(f"the export is not whole ({what}: was its temporary folder removed "
                          "meanwhile?); no version was published")


# The versions this process has published (renamed into place), for what an interrupt says.
PUBLISHED: list[str] = []


def _sync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that does not sync directories
        pass
    finally:
        os.close(fd)


def _sync_tree(folder: str) -> None:
    """Flushes every file under `folder`, then each folder's entries, to the disk: a version
    renamed into place must not be an empty `saved_model.pb` after a power cut."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(root)


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^\.tmp-\d+-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+$")


LOCK_FILE = ".lock"
ABANDONED_AFTER_S = 60.0


def _hold_lock(folder: str) -> int | None:
    """Creates `folder`/.lock and holds an exclusive lock on it until the returned file
    descriptor is closed (None where the platform has no flock)."""
    if fcntl is None:
        return None
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_abandoned_temporaries(export_base: str) -> list[str]:
    """Removes the temporary folders of exports on this host that nobody holds any more (a
    SIGKILL, a power cut: each would otherwise keep a whole model's copy); returns them.

    A live export holds a lock on its folder's `.lock` file for its whole run, whatever
    its process id means here (another PID namespace: a container sharing the host name),
    so only folders whose lock can be taken are removed; another host's, a folder without
    a lock file and one changed in the last `ABANDONED_AFTER_S` seconds (an export between
    creating its folder and taking the lock) are left alone.
    """
    removed = []
    if fcntl is None:
        return removed
    for name in os.listdir(export_base):
        match = _TEMPORARY.match(name)
        if not match or match["host"] != _HOST:
            continue
        folder = os.path.join(export_base, name)
        try:
            if time.time() - os.stat(folder).st_mtime < ABANDONED_AFTER_S:
                continue
        except OSError:
            continue
        if _lock_held(folder) is not False:  # held (a live export), or no lock file
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(name)
    return removed


# A temporary folder this old is named as left over even where its process may live on
# (another host's, one without a lock file, a process id reused since).
LEFTOVER_AFTER_S = 6 * 3600
_ANY_TEMPORARY = re.compile(r"^\.tmp-\d+-")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process (EPERM): alive
        return False
    return False


def _lock_held(folder: str) -> bool | None:
    """Whether a live export holds `folder`'s lock (True) or nobody does (False); None
    without a lock file (or flock)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_WRONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (releases the lock taken, if any)
    return False


def leftover_temporaries(export_base: str) -> list[tuple[str, int]]:
    """(name, bytes) of the temporary folders under `export_base` of exports that did not
    finish (a SIGKILL, a crash) and that `remove_abandoned_temporaries` leaves: on this host
    one whose process is gone and whose lock nobody holds, however fresh; any other one
    (another host's, without a lock file) unchanged for `LEFTOVER_AFTER_S`. Never removes
    anything: the caller says so, and a person decides."""
    try:
        names = sorted(os.listdir(export_base))
    except OSError:
        return []
    left = []
    for name in names:
        folder = os.path.join(export_base, name)
        if not _ANY_TEMPORARY.match(name) or not os.path.isdir(folder) or _lock_held(folder):
            continue
        match = _TEMPORARY.match(name)
        try:
            old = time.time() - os.stat(folder).st_mtime > LEFTOVER_AFTER_S
        except OSError:
            continue
        gone = bool(match) and match["host"] == _HOST and _process_gone(int(match["pid"]))
        if gone or old:
            left.append((name, storage.folder_bytes(folder)))
    return left


def leftovers_note(export_base: str) -> str | None:
    """One line naming `leftover_temporaries` with their sizes, or None."""
    left = leftover_temporaries(export_base)
    if not left:
        return None
    shown = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in left[:5])
    more = f" and {len(left) - 5} more" if len(left) > 5 else ""
    them = "them" if len(left) > 1 else "it"
    return (f"note: {export_base} holds {len(left)} temporary folder{'s' * (len(left) > 1)} "
            f"of exports that did not finish (killed?): {shown}{more}; delete {them} unless "
            "another export is writing there now")


def _set_version(config_file: str, version: int) -> None:
    """Rewrites the config's version, on disk before the next rename publishes the folder
    (as `_sync_tree` makes the rest): a new file moved over the old one, then synced."""
    with open(config_file, encoding="utf-8") as f:
        values = json.load(f)
    values["version"] = version
    with open(config_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(config_file + ".tmp", config_file)
    _sync_dir(os.path.dirname(config_file))


def main(argv: Sequence[str] | None = None, command: bool = False) -> int:
    """CLI entry point; returns the exit status. `command` (`python -m serving.export`):
    once the version is published, Ctrl-C and SIGTERM are ignored (nothing is left to
    stop, and an interrupt then could only make what it says untrue)."""
    args = cli.export_args(argv)
    from model import registry  # the model package owns how a run folder is restored

    error = cli.export_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    published_before = len(PUBLISHED)
    held = None
    try:
        # one export at a time under a base: two at once of the same weights both found
        # none of them there and published two versions (every client rebuilds its users'
        # states for a new one)
        held = _one_export_at_a_time(args.export_base)
        unfinished = registry.training_note(args.model_dir, args.checkpoint)
        for note in (unfinished, registry.older_config_note(args.model_dir)):
            if note:
                print(note, file=sys.stderr)
        # the checkpoint whose digests are recorded is the one loaded (chosen twice, a
        # training run's newer one was published labelled as the one before it)
        model, config, vocabulary = registry.load_model(args.model_dir, args.checkpoint)
        checkpoint = model.restored_checkpoint
        step = registry.checkpoint_step(checkpoint)
        source = {"model_dir": os.path.abspath(args.model_dir),
                  "checkpoint": os.path.abspath(checkpoint),
                  # the kind loaded (`best` falls back to the latest where the run has no
                  # best yet) and whether its training had finished, as evaluate records it
                  "step": step, "which": "best" if _is_best(checkpoint) else "latest",
                  "training_finished": unfinished is None,
                  "checkpoint_digest": checkpoint_digest(checkpoint),
                  "weights_digest": weights_digest(checkpoint),
                  "keep_repeats": args.keep_repeats}
        same, older = (None, None) if args.version is not None else \
            newest_with(args.export_base, source)
        if older is not None:
            print(f"note: version {older} under {args.export_base} holds the same weights, "
                  "exported by an older version of serving.export (its serving graph lacks "
                  f"later changes): exporting them again as version {older + 1}", file=sys.stderr)
        if same is not None:
            # a new version of the same weights would only make every client rebuild its
            # users' states (from their recent items: longer histories are lost)
            print(f"{args.model_dir}'s {args.checkpoint} checkpoint (step {step}) is version "
                  f"{same} under {args.export_base} already: nothing exported (--version N "
                  "exports it again)", file=sys.stderr)
            # (stdout names the version's folder as an export does: a script's
            # $(python -m serving.export ...) got nothing on a retry)
            print(f"already exported {args.model_dir} (step {step}, {_kind(checkpoint)}) to "
                  f"{os.path.join(args.export_base, str(same))}")
            _say_leftovers(args.export_base)
            return 0
        newest = next_version(args.export_base) - 1
        path = export_model(model, vocabulary, args.export_base, args.version, config, source,
                            collapse=False if args.keep_repeats else None)
        if args.version is not None and args.version < newest:
            print(f"note: version {args.version} is below the newest one under "
                  f"{args.export_base} ({newest}): TensorFlow Serving's default version policy "
                  "(latest) and serving.server serve the newest versions only (a specific "
                  "version policy, or serving.server --num-versions, serves it)",
                  file=sys.stderr)
        if command:
            processes.ignore_stop_signals()
    except KeyboardInterrupt:
        if len(PUBLISHED) == published_before:  # (the hook says "no version was published")
            raise
        print(f"interrupted after {PUBLISHED[-1]} was published: that version is complete",
              file=sys.stderr)
        return 130
    except ValueError as e:  # ExportError, RunError, ConfigError, DataError: user mistakes
        if argtypes.interrupt_in_chain(e):  # a stop signal inside a TensorFlow call
            raise KeyboardInterrupt from None
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, tf.errors.OpError) as e:  # a full disk, a folder we may not write
        if argtypes.interrupt_in_chain(e):
            raise KeyboardInterrupt from None
        reason = storage.storage_error(e)
        if reason is None and not isinstance(e, OSError):
            raise
        print(f"error: cannot write the export under {args.export_base}: {reason or e}; no "
              "version was published", file=sys.stderr)
        return 1
    finally:
        _let_others_export(args.export_base, held)
    print(f"exported {args.model_dir} (step {step}, {_kind(checkpoint)}) to {path}")
    _say_leftovers(args.export_base)
    return 0


def _one_export_at_a_time(export_base: str) -> tuple[int | None, bool]:
    """Takes an exclusive lock on the export base folder itself (`flock` of its descriptor:
    no file in it for TF Serving to see), waiting for another export that holds it; makes
    the folder when missing. Returns (the descriptor, None where the platform or file
    system has no such lock; whether the folder was made) for `_let_others_export`."""
    made = not os.path.isdir(export_base)
    os.makedirs(export_base, exist_ok=True)
    try:
        return storage.lock_folder(export_base), made
    except BlockingIOError:
        print(f"waiting for another export under {export_base}"
              f"{storage.lock_holder(export_base)} to finish", file=sys.stderr, flush=True)
        return storage.lock_folder(export_base, wait=True), made


def _let_others_export(export_base: str, held: tuple[int | None, bool] | None) -> None:
    """Releases `_one_export_at_a_time`'s lock; a folder it made that nothing was exported
    to is removed again."""
    if held is None:
        return
    fd, made = held
    if fd is not None:
        os.close(fd)
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(export_base)  # (only while empty)


def _is_best(checkpoint: str) -> bool:
    """Whether a checkpoint's path is a run's best on valid (else its latest)."""
    from model import registry

    return os.path.basename(os.path.dirname(checkpoint)) == registry.BEST_DIR


def _kind(checkpoint: str) -> str:
    """ "the best on valid checkpoint" or "the latest checkpoint", of a checkpoint's path."""
    return f"{'the best on valid' if _is_best(checkpoint) else 'the latest'} checkpoint"


def _say_leftovers(export_base: str) -> None:
    note = leftovers_note(export_base)
    if note:
        print(note, file=sys.stderr)


if __name__ == "__main__":
    # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C: the temporary folder goes
    # and the same line says so (exit 130)
    with argtypes.sigterm_as_interrupt():
        _status = processes.interrupted_is(_INTERRUPTED, lambda: main(command=True))
    processes.exit_now(_status)  # done and said: no teardown for a signal to land in
