"""HierTCN (You et al., WWW 2019): a high-level GRU across sessions and a low-level causal
TCN inside the session, conditioned on the high-level state at every step.

    h_0 = 0,  h_{n+1} = GRU(AGG(session_n), h_n),  AGG = mean item embedding + bias
    u_t = TCN([start, x_1 .. x_{t}] each concat h_n, projected to C)_t
    p(item | u_t) = softmax(u_t W^T + b)

With the repeat head (RepeatNet-style; on by default, with either loss), the next item is
a mixture
    p(item | u_t) = (1 - w_t) softmax(u_t W^T + b + seen bias) + w_t p_rep(item | u_t, recent items),
w_t = sigmoid(u_t . g + b_g), p_rep = attention of u_t over the newest `repeat_window`
(50) items of the user's history and session so far, and over the first items of the
user's last `start_items` sessions (`layers.RepeatHead`), summed per item; the seen bias is
a learned bias on the catalogue scores of the newest `history_size` (200) known items.
The reserved indices get probability 0, and everything is computed in log space.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from model import batching, layers
from model.config import ConfigError, HierTCNConfig
from model.sequence_model import SequenceModel, continuing_slots, session_starts
from pipeline import schema


def load_item_vectors(path: str, vocab_size: int, dim: int) -> np.ndarray:
    """Loads fixed item vectors [vocab, dim] aligned with items.tsv.

    Raises:
      ConfigError: missing file or wrong shape.
    """
    try:
        vectors = np.load(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read pretrained item vectors {path}: {e}") from None
    if vectors.shape != (vocab_size, dim):
        raise ConfigError(f"pretrained item vectors {path} have shape {vectors.shape}, expected "
                         f"[{vocab_size}, {dim}] (items.tsv rows, model.embedding_dim)")
    return vectors.astype(np.float32)


class HierTCN(SequenceModel):
    """The hierarchical model; see the module docstring and `SequenceModel` for the API."""

    config_class = HierTCNConfig
    xla_ready = True

    def __init__(self, config: HierTCNConfig, vocab_size: int,
                 item_counts: np.ndarray | None = None, load_pretrained: bool = True, **kwargs):
        """Creates the layers.

        Args:
          config: the hyper-parameters.
          vocab_size: V from items.tsv (including the reserved indices 0 and 1).
          item_counts: int [V] train counts, needed by the sampled loss.
          load_pretrained: read `config.pretrained_item_vectors` now (False when the
            weights come from a checkpoint).
        """
        super().__init__(config, vocab_size, item_counts, **kwargs)
        c = config
        pretrained = None
        if c.pretrained_item_vectors and load_pretrained:
            pretrained = load_item_vectors(c.pretrained_item_vectors, vocab_size, c.embedding_dim)
        if self.num_start_items and vocab_size > 2 ** 24:
            raise ValueError(f"model.start_items keeps item indices in the float32 state, exact up "
                             f"to {2 ** 24:,} items; this vocabulary has {vocab_size:,}: set "
                             "model.start_items to 0")
        self.item_embedding = layers.item_embedding(vocab_size, c.embedding_dim, pretrained,
                                                    frozen=bool(c.pretrained_item_vectors))
        self.aggregator = layers.SessionAggregator(name="agg")
        self.gru = layers.StackedGRU(c.gru_units, c.gru_layers, name="high_gru")
        self.input_projection = layers.StatefulInput(c.channels, name="input_projection")
        self.blocks = [layers.TemporalBlock(c.channels, c.kernel_size, 2 ** i, c.convs_per_block,
                                            c.dropout, name=f"tcn_block_{i}")
                       for i in range(c.num_blocks)]
        self.scorer = layers.ItemScorer(vocab_size, use_bias=c.output_bias, tied=c.tied_output,
                                        dtype="float32", name="item_scorer")
        self.summary_projection = (
            tf.keras.layers.Dense(c.channels, use_bias=False, name="summary_projection")
            if c.session_summary else None)
        self.repeat_head = (layers.RepeatHead(c.attention_size, num_starts=self.num_start_items,
                                              seen_bias=c.seen_bias,
                                              transition_bias=c.transition_bias,
                                              dtype="float32", name="repeat_head")
                            if c.uses_repeat_head else None)
        # False where no training session is longer than L (`model.train` sets it from
        # the data: `skip_chunk_context`): no slot then has a context, so the packed
        # encoder skips the context's work (about 6% of a step), with the same results.
        self.reads_chunk_context = bool(self.context_size)
        # Added to the catalogue logits of the mixture: the reserved indices get probability 0.
        self.reserved_mask = layers.reserved_mask(vocab_size)

    def session_only(self) -> bool:
        """Without the high level and the repeat head (the ablation) nothing before the
        session is read."""
        return not (self.config.high_level or self.config.uses_repeat_head)

    @property
    def state_size(self) -> int:
        return self.gru_size + self.num_start_items

    @property
    def gru_size(self) -> int:
        """The GRU part of the state (all layers' states): the state's first numbers."""
        return self.config.gru_units * self.config.gru_layers

    @property
    def num_start_items(self) -> int:
        """The start items part of the state (`config.start_items` R with the repeat head
        and the high level, else 0): the first items' indices of the user's last R
        sessions, oldest first, 0 for none (exact as float32 up to 2**24 items)."""
        c = self.config
        return c.start_items if c.uses_repeat_head and c.high_level else 0

    @staticmethod
    def _push_start(memory, first):
        """The start items [B, R] after a session whose first item is `first` float32 [B]
        (0: no session, unchanged)."""
        pushed = tf.concat([memory[:, 1:], first[:, None]], axis=1)
        return tf.where((first > 0)[:, None], pushed, memory)

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    def _sums(self, items: tf.Tensor):
        """int [..., T] -> (sum of non-padding embeddings [..., E], counts [...] float32)."""
        mask = tf.cast(items > 0, tf.float32)
        emb = tf.cast(self.item_embedding(items), tf.float32)
        return tf.reduce_sum(emb * mask[..., None], axis=-2), tf.reduce_sum(mask, axis=-1)

    def _gru_step(self, state, sums, counts):
        return tf.cast(self.gru(self.aggregator(sums, counts), state), tf.float32)

    def update_state(self, state, session_items):
        state, items = self.checked_inputs(state, session_items)
        if not self.config.high_level:
            return state
        sums, counts = self._sums(items)
        new = self._gru_step(state[:, :self.gru_size], sums, counts)
        if self.num_start_items:
            first = tf.cast(tf.reduce_sum(items[:, :1], axis=1), tf.float32)  # (0: T = 0)
            new = tf.concat([new, self._push_start(state[:, self.gru_size:], first)], axis=1)
        return tf.where((counts > 0)[:, None], new, state)

    def user_embeddings(self, state, prefix, training=False, carried=None):
        """See `SequenceModel.user_embeddings`; `carried` (sum of embeddings [B, E], count
        [B]) is the part of the session before `prefix` (a later chunk in training)."""
        state, prefix = self.checked_inputs(state, prefix, "prefix")
        if not self.config.high_level:
            state = tf.zeros_like(state)
        emb = self.item_embedding(prefix)
        # the TCN sees the GRU state (the start items are read by the repeat head only)
        x = self.input_projection((emb, tf.cast(state[:, :self.gru_size], emb.dtype)))
        if self.summary_projection is not None:
            mask = tf.cast(prefix > 0, tf.float32)
            sums = tf.cumsum(tf.cast(emb, tf.float32) * mask[..., None], axis=1)
            counts = tf.cumsum(mask, axis=1)
            # position p sees prefix[:, :p]
            sums = tf.pad(sums, [[0, 0], [1, 0], [0, 0]])
            counts = tf.pad(counts, [[0, 0], [1, 0]])
            if carried is not None:
                sums += carried[0][:, None]
                counts += carried[1][:, None]
            x += self._summary(sums, counts, emb.dtype)
        for block in self.blocks:
            x = block(x, training=training)
        return tf.cast(x, tf.float32)

    def _summary(self, sums, counts, dtype):
        """The session-summary input: projected mean embedding (0 before any item)."""
        return self.summary_projection(tf.cast(sums / tf.maximum(counts, 1.0)[..., None], dtype))

    def output_weights(self):
        tied = self.item_embedding.embeddings if self.config.tied_output else None
        return self.scorer.item_vectors(tied), self.scorer.bias

    def item_logits(self, user):
        tied = self.item_embedding.embeddings if self.config.tied_output else None
        return self.scorer(user, tied)

    def output_rows(self, indices):
        tied = self.item_embedding.embeddings if self.config.tied_output else None
        return self.scorer.rows(indices, tied)

    @property
    def history_size(self) -> int:
        return self.config.history_size if self.config.uses_repeat_head else 0

    def _repeat_parts(self, user, history, prefix, start_items=None):
        """The repeat head at every position.

        Args:
          user: [B, P, D]; history int64 [B, N'] (newest last, 0 pads anywhere); prefix
            int64 [B, T] (0 pads at the end); position p sees prefix[:, :p]; start_items
            float32 [B, R] the state's start items before the session (`config.start_items`).

        Returns:
          (context int64 [B, M = A + T (+ R)], log w [B, P], log (1 - w) [B, P],
          log p_rep over the context positions [B, P, M], seen). Position p points at the
          newest A = `attention_size` known items of history + prefix[:, :p] (the context
          holds the newest A known items of the history, then the prefix) and, with
          `start_items`, at the first items of the user's last R sessions. With nothing to
          point at (no known item visible) w is 0: log w = NEG_LOGIT, log (1 - w) = 0.
          `seen` is None without `config.seen_bias`, else (items int64 [B, N + T], once
          float32 [B, P, N + T]): the newest N = `history_size` known items of the history,
          then the prefix; `once` is 1 at one entry (the newest) of each distinct item
          among the newest N known items of history + prefix[:, :p], else 0.
        """
        history = _right_aligned(tf.cast(history, tf.int64))
        prefix = tf.cast(prefix, tf.int64)
        b, p, t = tf.shape(user)[0], tf.shape(user)[1], tf.shape(prefix)[1]
        causal = tf.range(t)[None, :] < tf.range(p)[:, None]                       # [P, T]
        prefix_known = prefix >= schema.NUM_RESERVED
        in_prefix = prefix_known[:, None, :] & causal[None]                        # [B, P, T]
        recent = _last_columns(history, self.config.attention_size)
        in_history = (recent >= schema.NUM_RESERVED)[:, None, :]
        known = tf.concat([tf.broadcast_to(in_history, [b, p, tf.shape(recent)[1]]), in_prefix],
                          axis=2)
        # age = known items newer than this one; the head sees the newest attention_size.
        # (A matmul with a strictly lower-triangular 0/1 matrix: exact counts, and much
        # faster than an int32 cumsum on CPU.)
        m = tf.shape(known)[2]
        newer = tf.cast(tf.range(m)[:, None] > tf.range(m)[None, :], tf.float32)  # [M', M]
        age = tf.cast(tf.matmul(tf.reshape(tf.cast(known, tf.float32), [-1, m]), newer), tf.int32)
        age = tf.reshape(age, tf.shape(known))
        visible = known & (age < self.config.attention_size)
        context = tf.concat([recent, prefix], axis=1)
        if self.num_start_items:
            starts = tf.cast(tf.round(start_items), tf.int64)                      # [B, R]
            # anything but a known item index (a state from elsewhere) points at nothing
            in_starts = (starts >= schema.NUM_RESERVED) & (starts < self.vocab_size)
            starts = tf.where(in_starts, starts, 0)
            in_starts = in_starts[:, None, :]
            visible = tf.concat([visible, tf.broadcast_to(in_starts, [b, p, self.num_start_items])],
                                axis=2)
            context = tf.concat([context, starts], axis=1)
        head_inputs = (user, self.item_embedding(context), visible, age)
        if self.config.transition_bias:
            # only where the entry before it is in the window too (age + 1 < A): what the
            # window alone decides, however history and session are split or served
            head_inputs += (self._follows(recent, prefix, p) * tf.cast(
                age < self.config.attention_size - 1, tf.float32),)
        gate, log_att = self.repeat_head(head_inputs)
        has = tf.reduce_any(visible, axis=2)
        log_w = tf.where(has, tf.math.log_sigmoid(gate), layers.NEG_LOGIT)
        log_keep = tf.where(has, tf.math.log_sigmoid(-gate), 0.0)
        seen = None
        if self.config.seen_bias:
            seen = self._seen_once(_last_columns(history, self.config.history_size), prefix,
                                   in_prefix)
        return context, log_w, log_keep, log_att, seen

    @staticmethod
    def _follows(recent, prefix, p):
        """float32 [B, P, A + T]: 1 where the entry of the context (`recent` [B, A], the
        history's newest entries right-aligned, then `prefix` [B, T]) came right after an
        earlier occurrence of the known item position p is on, else 0. As everywhere in
        the head, the sequence is the user's known items (the history's unknown items are
        gone once it is right-aligned, and the evaluator's buffer and the export's history
        drop them too): an entry's predecessor is the known item before it, and position p
        is on the newest known item before it, prefix[p - 1] when known, at position 0 the
        history's newest (the previous chunk's last item, or the user's last item before
        the session): the same in training, evaluation and serving. (The head masks what
        p may not see; the caller keeps the entries whose predecessor it sees.)"""
        sequence = tf.pad(tf.concat([recent, prefix], axis=1), [[0, 0], [0, 1]])  # [B, S]
        known = sequence >= schema.NUM_RESERVED
        s = tf.shape(sequence)[1]
        # the known items in order, after a 0 (none); the newest known before each entry
        order = tf.argsort(tf.where(known, 0, s) + tf.range(s)[None, :], axis=1, stable=True)
        compact = tf.pad(tf.gather(sequence, order, batch_dims=1), [[0, 0], [1, 0]])
        before = tf.gather(compact, tf.cumsum(tf.cast(known, tf.int32), axis=1, exclusive=True),
                           batch_dims=1)                                           # [B, S]
        a = tf.shape(recent)[1]
        on = before[:, a:a + p]               # newest known of recent + prefix[:p]  [B, P]
        follows = tf.equal(before[:, None, :-1], on[:, :, None]) & (
            on >= schema.NUM_RESERVED)[:, :, None]
        return tf.cast(follows, tf.float32)

    def _seen_once(self, history, prefix, in_prefix):
        """(items [B, N + T], once float32 [B, P, N + T]) of `_repeat_parts`.

        Args:
          history: int64 [B, N] known items right-aligned (newest last, pads first);
          prefix: int64 [B, T]; in_prefix: bool [B, P, T], prefix[t] is known and t < p.
        """
        n = self.config.history_size
        t = tf.shape(prefix)[1]
        known_prefix = tf.cast(in_prefix, tf.float32)
        # k[p] = known prefix items before p; a history item j (rank n - 1 - j from the
        # newest) is then at age n - 1 - j + k[p]: in the window when j >= k[p].
        k = tf.reduce_sum(known_prefix, axis=2)                                    # [B, P]
        column = tf.cast(tf.range(n), tf.float32)
        in_window = column[None, None, :] >= k[:, :, None]                         # [B, P, N]
        known_history = history >= schema.NUM_RESERVED
        # the newest occurrence in the history only: sorted by item (a stable sort keeps
        # equal items in their order), an entry followed by the same item is repeated later
        order = tf.argsort(history, axis=1, stable=True)
        ordered = tf.gather(history, order, batch_dims=1)
        repeated = tf.scatter_nd(
            tf.stack([tf.broadcast_to(tf.range(tf.shape(history)[0])[:, None], tf.shape(order)),
                      order], axis=-1),
            tf.pad(tf.equal(ordered[:, :-1], ordered[:, 1:]), [[0, 0], [0, 1]]), tf.shape(order))
        # ... and not in prefix[:p]: p <= the item's first position in the prefix
        in_session = tf.equal(history[:, :, None], prefix[:, None, :])           # [B, N, T]
        first_in_prefix = _first_true(in_session, t)                               # [B, N]
        position = tf.range(tf.shape(in_prefix)[1])
        history_once = (in_window & (known_history & ~repeated)[:, None, :]
                        & (position[None, :, None] <= first_in_prefix[:, None, :]))
        # A prefix item t counts at p while no later copy is before p, and while fewer than
        # n known items are newer: p <= next_t and k[p] - (known items up to t) < n.
        later_t = tf.range(t)[:, None] < tf.range(t)[None, :]                      # [T, T]
        copy = tf.equal(prefix[:, :, None], prefix[:, None, :]) & later_t[None]
        next_copy = _first_true(copy, t)                                           # [B, T]
        up_to = tf.cumsum(tf.cast(prefix >= schema.NUM_RESERVED, tf.float32), axis=1)  # [B, T]
        prefix_once = (in_prefix & (position[None, :, None] <= next_copy[:, None, :])
                       & (k[:, :, None] - up_to[:, None, :] < n))
        once = tf.cast(tf.concat([history_once, prefix_once], axis=2), tf.float32)
        return tf.concat([history, prefix], axis=1), once

    def _seen_shift(self, log_q, log_unseen):
        """log of the biased catalogue's normaliser, log((1 - q) + e^beta q) [...], from
        log q, q the catalogue probability of the seen items (`_seen_log_q`), and log(1 - q)
        summed over the other items (`_log_unseen`). The biased catalogue is
        log_cat + beta [seen] - shift. In log space: from q, log1p((e^beta - 1) q) lost the
        1 - q part to float32 where q nears 1 and beta is very negative (off by tens), and
        e^beta overflowed past beta = 88 (NaN losses and scores; numerics audit)."""
        beta = self.repeat_head.seen_bias
        return tf.reduce_logsumexp(tf.stack([log_unseen, beta + log_q]), axis=0)

    @staticmethod
    def _seen_log_q(once, log_cat_seen):
        """log q [...]: the catalogue log-probability of the seen items (`once`
        [..., N + T] marks each one's entry, `log_cat_seen` their log-probabilities)."""
        return tf.reduce_logsumexp(
            tf.where(once > 0, tf.minimum(log_cat_seen, 0.0), layers.NEG_LOGIT), axis=-1)

    def _log_unseen(self, user, log_norm, log_q, seen_items, once):
        """log(1 - q) [N] of `_seen_shift` at the events (user vectors [N, D], log Z [N],
        their seen items and `once` [N, N + T]): from q where q <= SURE, as the sum over
        the unseen items where it is more (those rows' logits computed again, as in
        `_log_norm_off`)."""
        def exact(rows):
            unseen = _rows_with(self.item_logits(tf.gather_nd(user, rows)) + self.reserved_mask,
                                tf.gather_nd(seen_items, rows),
                                tf.gather_nd(once, rows) * layers.NEG_LOGIT, add=True)
            return tf.reduce_logsumexp(unseen, axis=-1) - tf.gather_nd(log_norm, rows)
        return _log_complement(log_q, exact)

    def _catalogue_log_probs(self, user):
        """[..., D] -> [..., V] log-softmax of the catalogue scores, reserved indices ~ -1e9."""
        return tf.nn.log_softmax(self.item_logits(user) + self.reserved_mask, axis=-1)

    def item_log_probs(self, user, history, prefix, state=None, positions=None, current=None):
        if self.repeat_head is None:
            raise ValueError("item_log_probs needs a model with model.repeat_head on; "
                             "use item_logits")
        user = tf.cast(user, tf.float32)
        start_items = None
        if self.num_start_items:
            if state is None:
                raise ValueError("a model with model.start_items needs the user state here")
            start_items = tf.convert_to_tensor(state, tf.float32)[:, self.gru_size:]
        context, log_w, log_keep, log_att, seen = self._repeat_parts(user, history, prefix,
                                                                     start_items)
        # Only the M context items get a repeat part, so the mixture is the scaled catalogue
        # with those few entries replaced (no [B, P, V] repeat tensor): p_rep of the item
        # at each context position is the attention summed over every position holding it.
        log_rep = log_w[..., None] + _log_sum_by_item(log_att, context)           # [B, P, M]
        seen_items, once = seen if seen is not None else (None, None)
        if positions is not None:
            # Each chosen position becomes a row of its own ([n, 1, ...]): the [.., V]
            # catalogue part below is computed for those positions only.
            rows = positions[:, 0]
            user, log_keep, log_rep = (tf.gather_nd(x, positions)[:, None]
                                       for x in (user, log_keep, log_rep))
            context = tf.gather(context, rows)
            if seen is not None:
                seen_items = tf.gather(seen_items, rows)
                once = tf.gather_nd(once, positions)[:, None]
        log_cat = self._catalogue_log_probs(user)                                   # [B, P, V]
        b, p, m = tf.shape(log_rep)[0], tf.shape(log_rep)[1], tf.shape(log_rep)[2]
        # Every item's log-probability is the catalogue's plus a constant per position but
        # the few the head changes (the seen items and the context's): one pass over the
        # [B, P, V] scores adds the constant, two scatters set the few. (A scatter copies
        # the whole tensor: five of them and two masked copies for log-sum-exps were half
        # an evaluation's time at 25,690 items, 712 us per scored event, now 366.)
        offset = log_keep                                                           # [B, P]
        if seen is not None:  # the seen bias: beta on each seen item once, a new normaliser
            s = tf.shape(seen_items)[1]
            seen_items = tf.broadcast_to(seen_items[:, None, :], [b, p, s])
            log_q = self._seen_log_q(once, tf.gather(log_cat, seen_items, batch_dims=2))
            offset -= self._seen_shift(log_q, self._log_unseen_rows(log_cat, log_q, seen_items,
                                                                    once))
        out = log_cat + offset[..., None]
        if seen is not None:
            out = tf.tensor_scatter_nd_add(out, _scatter_index(seen_items),
                                           once * self.repeat_head.seen_bias)
        items = tf.broadcast_to(context[:, None, :], [b, p, m])
        # An item held at several positions gets the same value from each of them.
        mixed = tf.reduce_logsumexp(tf.stack([
            tf.gather(out, items, batch_dims=2), log_rep]), axis=0)  # log 0 = -inf
        if self.config.exclude_current:
            # The item a position is on is never its target (the pipeline collapses
            # immediate repeats): the distribution given that, p / (1 - p(current)) and 0
            # for the current item (its score NEG_LOGIT), as `repeat_losses` trains it.
            on = tf.zeros([tf.shape(prefix)[0], 1], tf.int64) if current is None else \
                tf.reshape(tf.cast(current, tf.int64), [-1, 1])
            on = tf.concat([on, prefix], axis=1)[:, :tf.shape(user)[1]] if positions is None \
                else tf.gather_nd(tf.concat([on, prefix], axis=1), positions)[:, None]
            on = on[..., None]                                                     # [B, P, 1]
            known = on >= schema.NUM_RESERVED
            at = tf.equal(items, on)                                               # [B, P, M]
            log_p = tf.where(tf.reduce_any(at, axis=-1, keepdims=True),
                             tf.reduce_max(tf.where(at, mixed, layers.NEG_LOGIT), axis=-1,
                                           keepdims=True),
                             tf.gather(out, on, batch_dims=2))                     # [B, P, 1]
            log_off = tf.where(known, self._log_off_rows(out, items, mixed, on, log_p), 0.0)
            out -= log_off
            mixed = tf.where(at & known, layers.NEG_LOGIT, mixed - log_off)
            # the current item's entry (where it is not known, a copy of the first
            # context entry's: one value per index)
            items = tf.concat([items, tf.where(known, on, items[..., :1])], axis=-1)
            mixed = tf.concat([mixed, tf.where(known, layers.NEG_LOGIT, mixed[..., :1])],
                              axis=-1)
        out = tf.tensor_scatter_nd_update(out, _scatter_index(items), mixed)
        return out if positions is None else out[:, 0]

    @staticmethod
    def _log_unseen_rows(log_cat, log_q, seen_items, once):
        """log(1 - q) [B, P] of `_seen_shift` from the catalogue's log-probabilities
        `log_cat` [B, P, V]: from q where q <= SURE, as the sum over the unseen items (their
        rows alone) where it is more (`_log_unseen` at training)."""
        return _log_complement(log_q, lambda rows: tf.reduce_logsumexp(_rows_with(
            tf.gather_nd(log_cat, rows), tf.gather_nd(seen_items, rows),
            tf.gather_nd(once, rows) * layers.NEG_LOGIT, add=True), axis=-1))

    @staticmethod
    def _log_off_rows(out, items, mixed, on, log_p):
        """log(1 - p(current)) [B, P, 1]: from p (its log `log_p` [B, P, 1]) where p <=
        SURE, as the sum over the other items where it is more (those rows alone: with the
        mixture's values `mixed` [B, P, M] at `items` set into `out` [B, P, V], `on`
        [B, P, 1] at NEG_LOGIT; where p nears 1, 1 - p is lost to float32)."""
        def exact(rows):
            full = _rows_with(tf.gather_nd(out, rows), tf.gather_nd(items, rows),
                              tf.gather_nd(mixed, rows))
            full = _rows_with(full, tf.gather_nd(on, rows),
                              tf.fill(tf.shape(rows[:, :1]), layers.NEG_LOGIT))
            return tf.reduce_logsumexp(full, axis=-1)
        return _log_complement(log_p[..., 0], exact)[..., None]

    def repeat_losses(self, user, targets, where, flat_items, batch, cache, training=True):
        user = tf.cast(user, tf.float32)
        # the head works on the slots' positions up to the batch's longest slot T <= L
        longest = tf.reduce_max(tf.reduce_sum(tf.cast(flat_items > 0, tf.int32), axis=1))
        flat_items = flat_items[:, :longest]
        shape = tf.concat([tf.shape(flat_items, out_type=tf.int64), [user.shape[-1]]], 0)
        slots_user = tf.scatter_nd(where, user, shape)                     # [B * S, T, D]
        history, columns, stream = self._slot_history_columns(batch)            # [B * S, N]
        columns = columns[:, :self.config.history_size + longest]
        start_items = None
        if self.num_start_items:  # before each slot (cheap to recompute: no GRU)
            start_items, _, _ = self._slot_start_items(
                tf.cast(batch["items"], tf.int64)[:, :, 0], batch["reset"], batch["session_end"],
                cache)
            start_items = tf.reshape(start_items, [tf.shape(flat_items)[0], self.num_start_items])
        context, log_w, log_keep, log_att, seen = self._repeat_parts(
            slots_user, history, flat_items, start_items)
        slot_context = tf.gather(context, where[:, 0])                             # [N, M]
        log_att = tf.gather_nd(log_att, where)
        log_keep = tf.gather_nd(log_keep, where)
        log_w = tf.gather_nd(log_w, where)
        # The catalogue log-probabilities from the output layer's rows (no gather from the
        # [N, V] logits, whose gradient would be dense): log p = logit - log Z.
        vectors, bias = self.output_weights()
        vectors, bias = tf.cast(vectors, tf.float32), tf.cast(bias, tf.float32)

        def logit(items):
            return tf.reduce_sum(user * tf.gather(vectors, items), axis=-1) + tf.gather(bias, items)

        target_logit = logit(targets)
        seen_logits = once = seen_items = None
        if seen is not None:
            seen_items, once = seen
            seen_logits = self._seen_logits(user, where, stream, columns, vectors, bias,
                                            tf.shape(batch["items"], tf.int64)[1])
            once = tf.gather_nd(once, where)
            seen_items = tf.gather(seen_items, where[:, 0])

        def seen_count(items):  # 1 where the item is among the event's seen items, else 0
            return tf.reduce_sum(once * tf.cast(seen_items == items[:, None], tf.float32), axis=1)

        target_seen = None if seen is None else seen_count(targets)
        on = on_logit = None
        if self.config.exclude_current:
            # The item each event is on: the slot's previous position, or at a slot's first
            # position, for a slot that continues a session (a later chunk of it), the
            # newest item of the slot's history (the previous chunk's last); 0 for none
            # and where it is the target (the likelihood below is then unconditioned).
            before = where[:, 1] - 1
            in_slot = tf.gather(tf.gather(flat_items, where[:, 0]), tf.maximum(before, 0),
                                batch_dims=1)
            continued = tf.gather(history[:, -1] * tf.cast(
                self.continues_session(batch, cache), tf.int64), where[:, 0])
            on = tf.where(before >= 0, in_slot, continued)
            on = tf.where((on >= schema.NUM_RESERVED) & (on != targets), on, 0)
            # its logit: without the seen bias from its output row; with it, a seen item's,
            # the slot's own column before the event or its history's newest (column N - 1)
            on_logit = (logit(on) if seen is None else tf.gather(
                seen_logits, self.config.history_size + before, batch_dims=1))
        log_norm_off = None  # log Z without the current item's term (`on`)
        log_unseen = None  # log of the unseen items' share of Z (with the seen bias)
        if training and self.sampler is not None:
            log_norm, log_norm_off, log_unseen = self._sampled_log_norm(
                user, targets, target_logit, vectors, bias, where, seen, seen_logits, once,
                target_seen, on, on_logit)
        else:
            logits = self.item_logits(user) + self.reserved_mask
            log_norm = tf.reduce_logsumexp(logits, axis=-1)
            if on is not None:
                log_norm_off = self._log_norm_off(user, log_norm, on, on_logit)
        log_keep_raw = shift = log_keep
        if seen is not None:
            log_q = self._seen_log_q(once, seen_logits - log_norm[:, None])
            if log_unseen is None:
                log_unseen = self._log_unseen(user, log_norm, log_q, seen_items, once)
            shift = self._seen_shift(log_q, log_unseen)
            log_keep -= shift

        def log_prob(items, items_logit, items_seen):
            """log p of the mixture at each event for items [N]."""
            log_cat = items_logit - log_norm
            if seen is not None:
                log_cat += items_seen * self.repeat_head.seen_bias
            log_rep = tf.reduce_logsumexp(
                tf.where(slot_context == items[:, None], log_att, layers.NEG_LOGIT), axis=1)
            return tf.reduce_logsumexp(tf.stack([log_keep + log_cat, log_w + log_rep]), axis=0)

        nll = -log_prob(targets, target_logit, target_seen)
        if on is None:
            return nll
        # The next item is known not to be the one the event is on (the pipeline collapses
        # immediate repeats), so the likelihood is conditioned on that:
        # log p(target) - log(1 - p(current)), 1 - p(current) summed over the other items
        # (not taken from p(current): where p(current) nears 1 that difference is lost to
        # float32, and a clamp then held it at 1e-6; long runs diverged there, the loss in
        # the thousands). The catalogue's part: its normaliser without the current item's
        # term (with the seen bias, the seen items' share without it too); the repeat
        # part's: the attention on the context positions of other items.
        log_off_cat = log_norm_off - log_norm
        if seen is not None:
            # (the unseen items are the same: the current item is a seen one)
            once_off = once * tf.cast(seen_items != on[:, None], tf.float32)
            log_off_cat += self._seen_shift(
                self._seen_log_q(once_off, seen_logits - log_norm_off[:, None]),
                log_unseen + log_norm - log_norm_off)
            log_off_cat -= shift
        log_off_rep = tf.reduce_logsumexp(
            tf.where(slot_context != on[:, None], log_att, layers.NEG_LOGIT), axis=1)
        log_off = tf.reduce_logsumexp(tf.stack([log_keep_raw + log_off_cat,
                                                log_w + log_off_rep]), axis=0)
        return nll + tf.where(on > 0, log_off, 0.0)

    def _log_norm_off(self, user, log_norm, on, on_logit):
        """log Z without the current item's term [N], from the user vectors [N, D] and log
        Z [N]: log Z + log(1 - p), p the item's catalogue probability, where p <= SURE (off
        by at most p / (1 - p) times log p's float32 error, below 1e-3 for logits up to a
        hundred), and the sum over the other items where p is more (the difference
        cancels), for those rows alone (a masked pass over every row cost 17% of a step,
        and a gather from the [N, V] logits a dense gradient of their size: these rows'
        logits are computed again instead)."""
        log_sure = np.log(SURE)
        log_p = tf.minimum(on_logit - log_norm, log_sure)
        off = log_norm + tf.math.log1p(-tf.exp(log_p))
        rows = tf.where((on > 0) & (on_logit - log_norm > log_sure))                  # [K, 1]
        sure = self.item_logits(tf.gather_nd(user, rows)) + self.reserved_mask + tf.one_hot(
            tf.gather_nd(on, rows), self.vocab_size, on_value=layers.NEG_LOGIT, off_value=0.0)
        return tf.tensor_scatter_nd_update(off, rows, tf.reduce_logsumexp(sure, axis=-1))

    def continues_session(self, batch, cache) -> tf.Tensor:
        """See `SequenceModel.continues_session`: for slot 0, the cache's running count
        (`_carried_count`)."""
        return continuing_slots(batch["reset"], batch["session_end"], cache[2] > 0)

    def _slot_history_columns(self, batch):
        """(each slot's history int64 [B * S, N] as `batching.slot_histories` gives it, the
        columns of its seen items [B * S, N + T] in its row's stream, the streams
        [B, N + E], E the most events of a row).

        A row's stream is its `history` [N] then its slots' items packed in order (the
        row's events): the seen items of every slot of the row are among them (the newest
        N known items of the slot's history, then its own items), so their catalogue
        logits can be computed once per row (`_seen_logits`). The columns come from the
        same ops as the items, run on each known entry's column instead of its item
        (unknown and padding entries kept as 1 and 0, so the same entries move).
        """
        items = tf.cast(batch["items"], tf.int64)
        b, s, l = tf.shape(items)[0], tf.shape(items)[1], tf.shape(items)[2]
        row_history = tf.cast(batch["history"], tf.int64)
        n = tf.shape(row_history, out_type=tf.int64)[1]
        flat = tf.reshape(items, [b, s * l])
        packed = n + tf.cumsum(tf.cast(flat > 0, tf.int64), axis=1) - 1          # stream column
        cells = tf.where(flat > 0)
        longest = tf.reduce_max(tf.reduce_sum(tf.cast(flat > 0, tf.int64), axis=1))
        stream = tf.concat([row_history, tf.scatter_nd(
            tf.stack([cells[:, 0], tf.gather_nd(packed, cells) - n], 1),
            tf.gather_nd(flat, cells), tf.stack([tf.cast(b, tf.int64), longest]))], axis=1)
        known = flat >= schema.NUM_RESERVED
        code_history = tf.where(row_history >= schema.NUM_RESERVED,
                                tf.range(n)[None, :] + schema.NUM_RESERVED, row_history)
        code_items = tf.where(known, packed + schema.NUM_RESERVED, flat)
        coded = batching.slot_histories(code_history, tf.reshape(code_items, [b, s, l]),
                                        batch["reset"])                       # [B, S, N]
        coded = tf.reshape(coded, [b * s, -1])
        slot_row = tf.range(b * s, dtype=tf.int64)[:, None] // tf.cast(s, tf.int64)
        at = tf.stack([tf.broadcast_to(slot_row, tf.shape(coded, out_type=tf.int64)),
                       tf.maximum(coded - schema.NUM_RESERVED, 0)], axis=-1)
        history = tf.where(coded >= schema.NUM_RESERVED, tf.gather_nd(stream, at), coded)
        columns = tf.maximum(_last_columns(_right_aligned(coded), self.config.history_size)
                             - schema.NUM_RESERVED, 0)
        own = tf.reshape(tf.where(known, packed, 0), [b * s, l])
        return history, tf.concat([columns, own], axis=1), stream

    def _seen_logits(self, user, where, stream, columns, vectors, bias, slots_per_row):
        """Catalogue logits [N, N + T] of the seen items of each target's slot (at
        `columns` of its row's `stream`, `_slot_history_columns`) for the target's user
        vector [N, D]: one matmul per row of its events by its stream, so that each stream
        item's output row is gathered (and its gradient summed) once per row rather than
        once per slot, and no padding is multiplied."""
        row = where[:, 0] // slots_per_row
        b = tf.cast(tf.shape(stream)[0], tf.int64)
        count = tf.math.bincount(tf.cast(row, tf.int32), minlength=tf.cast(b, tf.int32),
                                 dtype=tf.int64)
        # the targets are in (row, slot, position) order: their rank within the row
        rank = tf.range(tf.shape(row, out_type=tf.int64)[0]) - tf.gather(
            tf.cumsum(count, exclusive=True), row)
        at = tf.stack([row, rank], axis=1)
        row_user = tf.scatter_nd(at, user, tf.stack([b, tf.reduce_max(count),
                                                     tf.shape(user, out_type=tf.int64)[1]]))
        logits = (tf.matmul(row_user, tf.gather(vectors, stream), transpose_b=True)
                  + tf.gather(bias, stream)[:, None, :])                       # [B, E, N + E]
        return tf.gather(tf.gather_nd(logits, at), tf.gather(columns, where[:, 0]), batch_dims=1)

    def _sampled_log_norm(self, user, targets, target_logit, vectors, bias, where, seen,
                          seen_logits, once, target_seen, on=None, on_logit=None):
        """log Z of the catalogue softmax at each target, estimated for the sampled loss.

        Z = the exact terms of the target and of the distinct items the event has seen (so
        the seen bias's q is exact given Z) + an importance-sampling estimate of the rest:
        each of the batch's negatives that is neither, weighted by 1 / its inclusion
        probability (nearly unbiased for the sum over the other items: `Sampler.__call__`).
        Args as in `repeat_losses`; `seen_logits`, `once` [N, N + T] and `target_seen` [N]
        at the targets, None without the seen bias; `on` [N] the item each event is on (0: none)
        and `on_logit` its logit, counted exactly too (without the seen bias; with it, it
        is a seen item), so that p(current), which conditions the likelihood, is exact
        given Z: estimated, it would mostly lack its own term and exceed 1.

        Returns:
          (log Z [N], log Z without `on`'s term [N] or None without `on`, log of the unseen
          items' share of Z [N] or None without the seen bias).
        """
        ids, log_inclusion = self.sampler(targets)                                  # [k]
        sample_logits = (tf.matmul(user, tf.gather(vectors, ids), transpose_b=True)
                         + tf.gather(bias, ids) - log_inclusion)                     # [N, k]
        exact = ids[None, :] == targets[:, None]         # the target, counted exactly
        terms = [target_logit[:, None]]
        if seen is not None:
            seen_items, _ = seen
            k = tf.shape(ids)[0]
            # each seen item's column in the sample (-1: not sampled), per event
            column = tf.scatter_nd(ids[:, None], tf.range(1, k + 1), [self.vocab_size]) - 1
            seen_column = tf.gather(tf.gather(column, seen_items), where[:, 0])     # [N, N + T]
            seen_items_at = tf.gather(seen_items, where[:, 0])                      # [N, N + T]
            hits = tf.where((once > 0) & (seen_column >= 0))                        # [H, 2]
            exact |= tf.scatter_nd(
                tf.stack([hits[:, 0], tf.cast(tf.gather_nd(seen_column, hits), tf.int64)], 1),
                tf.ones(tf.shape(hits)[:1], tf.float32), tf.shape(sample_logits, tf.int64)) > 0
            terms = [tf.where(target_seen > 0, layers.NEG_LOGIT, target_logit)[:, None],
                     tf.where(once > 0, seen_logits, layers.NEG_LOGIT)]
        elif on is not None:  # (0 where it is the target or there is none)
            exact |= (ids[None, :] == on[:, None]) & (on > 0)[:, None]
        terms.append(tf.where(exact, layers.NEG_LOGIT, sample_logits))
        # With `on`: Z without the current item's term first (`repeat_losses`), then Z
        if seen is not None and on is not None:  # (a seen item: its column left out)
            terms[1] = tf.where(seen_items_at == on[:, None], layers.NEG_LOGIT, terms[1])
        log_unseen = None
        if seen is None:
            log_norm = tf.reduce_logsumexp(tf.concat(terms, axis=1), axis=1)
        else:  # the unseen items' part apart (the target's where unseen, the sample's):
            # `_seen_shift` takes 1 - q from it
            log_unseen = tf.reduce_logsumexp(tf.concat([terms[0], terms[2]], axis=1), axis=1)
            log_norm = tf.reduce_logsumexp(
                tf.stack([log_unseen, tf.reduce_logsumexp(terms[1], axis=1)]), axis=0)
        log_norm_off = None
        if on is not None:
            log_norm_off, on_term = log_norm, tf.where(on > 0, on_logit, layers.NEG_LOGIT)
            log_norm = tf.reduce_logsumexp(tf.stack([log_norm_off, on_term]), axis=0)
        return log_norm, log_norm_off, None if seen is None else log_unseen - log_norm

    def train_cache(self, batch_size: int):
        """(state [B, H], running AGG sum [B, E], running count [B]) per row.

        The running sums let a session split over chunks or batches aggregate exactly as
        `update_state` does on the whole session.
        """
        e = self.item_embedding.output_dim
        cache = (self.initial_state(batch_size), tf.zeros([batch_size, e], tf.float32),
                 tf.zeros([batch_size], tf.float32))
        if self.num_start_items:  # each row's unfinished session: its first item, under way
            cache += (tf.zeros([batch_size, 2], tf.float32),)
        if self.context_size:  # each row's unfinished session: its last K items (last entry)
            cache += (tf.zeros([batch_size, self.context_size], tf.int64),)
        return cache

    @property
    def context_size(self) -> int:
        """K, the session items before a chunk that training lets its convolutions read
        (`config.chunk_context`): the TCN's receptive field, which is all that any of its
        outputs reads; 0 when off."""
        return self.config.receptive_field if self.config.chunk_context else 0

    def skip_chunk_context(self, longest_session: int | None, max_session_length: int) -> None:
        """Before the first training step: when the training sessions are known to fit in
        L (`longest_session` <= `max_session_length`; None: not known), no slot continues a
        session, so none has a context to read; the cache keeps its (empty) context."""
        if longest_session is not None and longest_session <= max_session_length:
            self.reads_chunk_context = False

    def _split_context(self, cache):
        """(the cache without the chunk context, the context int64 [B, K] or None)."""
        if self.context_size:
            return tuple(cache[:-1]), cache[-1]
        return tuple(cache), None

    def _slot_contexts(self, items, batch, context):
        """Each slot's chunk context and the rows' context after the batch: the
        `batching.slot_histories` windows of the cache's context [B, K] and the row's
        items, blanked before each slot's session start (a session starts at `reset` or
        after `session_end`; the cache holds zeros once a row's session has ended).

        Returns:
          (int64 [B, S, K] each slot's context, newest last, 0 in front; int64 [B, K] the
          rows' context after the batch: all 0 where the last slot ended its session).
        """
        per_slot, after = batching.slot_histories(
            context, items, session_starts(batch["reset"], batch["session_end"]), after=True)
        return per_slot, tf.where(batch["session_end"][:, -1:], tf.zeros_like(after), after)

    def _chunk_inputs(self, items, batch, context):
        """The slots with their chunk contexts in front: (int64 [B * S, K + L] each slot's
        context items then its own, left-aligned; int64 [B * S] the context lengths; the
        rows' context after the batch)."""
        per_slot, after = self._slot_contexts(items, batch, context)
        b, s = tf.shape(items)[0], items.shape[1]
        return _with_context(tf.reshape(per_slot, [b * s, -1]),
                             tf.reshape(items, [b * s, -1])) + (after,)

    def session_states(self, batch, cache, training):
        """Runs the high-level GRU over the S slots first (AGG does not depend on the state),
        zeroing the state at `reset` and stepping it at `session_end`."""
        items = tf.cast(batch["items"], tf.int64)
        core, context = self._split_context(cache)
        before, _, _, new_cache = self._slot_states(items, batch, core)
        if context is not None:
            new_cache += (self._slot_contexts(items, batch, context)[1],)
        return before, new_cache

    def _slot_states(self, items, batch, cache):
        """(state before each slot [B, S, H], the session's embedding sum [B, S, E] and
        count [B, S] before each slot, the cache after the batch)."""
        if not (self.config.high_level or self.config.session_summary):
            b, s = tf.shape(items)[0], tf.shape(items)[1]
            e = self.item_embedding.output_dim
            return (tf.zeros(tf.stack([b, s, self.state_size])), tf.zeros(tf.stack([b, s, e])),
                    tf.zeros(tf.stack([b, s])), self._carried_count(items, batch, cache))
        sums, counts = self._sums(items)
        return self._states_from_sums(sums, counts, batch["reset"], batch["session_end"], cache,
                                      items[:, :, 0])

    def encode(self, batch, cache, training):
        """The padded encoder (`SequenceModel.encode`), with the session summary carried
        into later chunks."""
        items = tf.cast(batch["items"], tf.int64)
        b, s, l = tf.shape(items)[0], items.shape[1], tf.shape(items)[2]
        core, context = self._split_context(cache)
        before, sums, counts, new_cache = self._slot_states(items, batch, core)
        carried = (tf.reshape(sums, [b * s, -1]), tf.reshape(counts, [-1]))
        before = tf.reshape(before, [b * s, self.state_size])
        if context is None:
            u = self.user_embeddings(before, tf.reshape(items, [b * s, l])[:, :-1],
                                     training=training, carried=carried)
            return u, new_cache
        seq, lengths, after = self._chunk_inputs(items, batch, context)
        if self.summary_projection is not None:  # the carried sums hold the context's items
            ctx_sums, _ = self._sums(tf.where(
                tf.range(tf.shape(seq, out_type=tf.int64)[1])[None, :] < lengths[:, None],
                seq, tf.zeros_like(seq)))
            carried = (carried[0] - ctx_sums, carried[1] - tf.cast(lengths, tf.float32))
        u = self.user_embeddings(before, seq[:, :-1], training=training, carried=carried)
        # the slot's own positions: its targets come after its context
        u = tf.gather(u, lengths[:, None] + tf.range(l, dtype=tf.int64)[None, :], batch_dims=1)
        return u, new_cache + (after,)

    @staticmethod
    def _carried_count(items, batch, cache):
        """The cache with its running count (`cache[2]`, the items of each row's session
        under way) carried through the batch, for a model without the high level or the
        session summary, which keep it with their sums (`_states_from_sums`):
        `continues_session` reads it to tell a later chunk in slot 0."""
        counts = tf.reduce_sum(tf.cast(items > 0, tf.float32), axis=2)       # [B, S]
        starts = session_starts(batch["reset"], batch["session_end"])
        session = tf.cumsum(tf.cast(starts, tf.int32), axis=1)               # 0: the cache's
        last = tf.equal(session, session[:, -1:])                            # the last's session
        count = (tf.reduce_sum(tf.where(last, counts, 0.0), axis=1)
                 + tf.where(tf.equal(session[:, -1], 0), cache[2], 0.0))
        return (cache[0], cache[1], tf.where(batch["session_end"][:, -1], 0.0, count),
                *cache[3:])

    def _states_from_sums(self, sums, counts, reset, end, cache, first_items):
        """`_slot_states` from the slots' embedding sums [B, S, E] and counts [B, S].

        The session aggregates do not depend on the state, so they come first, for all S
        slots at once: slot s sums the slots t <= s of its session (a session starts at
        `reset` or after `session_end`; one that started before the batch adds the
        cache's running sum). Then the first GRU layer's input projection of all of them
        is one matmul, and only the recurrence runs slot by slot. `first_items` int64
        [B, S] (each slot's position 0) feeds the start items (`_slot_start_items`).
        """
        state, acc, cnt = cache[:3]
        num = reset.shape[1]
        starts = session_starts(reset, end)                                  # [B, S]
        session = tf.cumsum(tf.cast(starts, tf.int32), axis=1)               # 0: the cache's
        same = tf.equal(session[:, :, None], session[:, None, :])            # [B, S, S]
        causal = tf.range(num)[None, :] <= tf.range(num)[:, None]            # t <= s
        within = tf.cast(same & causal[None], tf.float32)
        carried = tf.cast(tf.equal(session, 0), tf.float32)                  # [B, S]
        accs = tf.einsum("bst,bte->bse", within, sums) + carried[..., None] * acc[:, None]
        cnts = tf.einsum("bst,bt->bs", within, counts) + carried * cnt[:, None]
        ended = end[:, -1]
        acc = tf.where(ended[:, None], 0.0, accs[:, -1])
        cnt = tf.where(ended, 0.0, cnts[:, -1])
        if not self.config.high_level:
            before = tf.zeros(tf.concat([tf.shape(counts), [self.state_size]], 0))
            return before, accs - sums, cnts - counts, (state, acc, cnt, *cache[3:])
        projected = self.gru.project_inputs(self.aggregator(accs, cnts))     # [B, S, 3U]
        weights = self.gru.step_weights(projected.dtype)
        before = []
        state = state[:, :self.gru_size]
        for s, x in enumerate(tf.unstack(projected, axis=1)):
            state = tf.where(reset[:, s, None], 0.0, state)
            before.append(state)
            new = tf.cast(self.gru.step(x, state, weights), tf.float32)
            state = tf.where(end[:, s, None], new, state)
        before, rest = tf.stack(before, axis=1), ()
        if self.num_start_items:
            starts_before, starts_after, pending = self._slot_start_items(first_items, reset,
                                                                          end, cache)
            before = tf.concat([before, starts_before], axis=2)
            state = tf.concat([state, starts_after], axis=1)
            rest = (pending,)
        return before, accs - sums, cnts - counts, (state, acc, cnt, *rest)

    def _slot_start_items(self, first_items, reset, end, cache):
        """The start items through a batch (`config.start_items`).

        Args:
          first_items: int64 [B, S] each slot's position 0; reset, end: bool [B, S];
          cache: `train_cache` before the batch.

        Returns:
          (start items before each slot [B, S, R], after the batch [B, R], the cache's
          unfinished-session entry after the batch [B, 2]).
        """
        # Each slot's session's first item: at position 0 of the slot where the session
        # started in this batch, or the cache's for a session already under way (its second
        # column 1; 0 when the row's last session ended with the previous batch, so that
        # slot 0 starts one).
        memory = cache[0][:, self.gru_size:]
        pending, under_way = cache[3][:, :1], cache[3][:, 1] > 0.5
        starts = session_starts(reset, end)
        new_at = tf.concat([starts[:, :1] | ~under_way[:, None], starts[:, 1:]], axis=1)
        ids = tf.cumsum(tf.cast(new_at, tf.int32), axis=1)
        known = tf.cast(new_at & (first_items > 0), tf.float32)                # [B, S]
        started_at = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]) & new_at[:, None, :],
                             tf.float32)                                       # [B, S, S]
        carried = tf.cast(tf.equal(ids, 0), tf.float32)
        # (one nonzero term per sum: exact)
        firsts = (tf.einsum("bst,bt->bs", started_at, tf.cast(first_items, tf.float32) * known)
                  + carried * pending)                                         # [B, S]
        # under way after the batch: the last slot's session has its first item
        has = (tf.einsum("bt,bt->b", started_at[:, -1], known)
               + carried[:, -1] * tf.cast(under_way, tf.float32))
        pending = tf.where(end[:, -1, None], 0.0, tf.stack([firsts[:, -1], has], axis=1))
        before = []
        for s in range(reset.shape[1]):
            memory = tf.where(reset[:, s, None], 0.0, memory)
            before.append(memory)
            memory = tf.where(end[:, s, None], self._push_start(memory, firsts[:, s]), memory)
        return tf.stack(before, axis=1), memory, pending

    def encode_events(self, batch, cache, training):
        """The training encoder on the packed events: no compute on padding.

        The [B, S, L] slots hold on average far fewer than L items, so instead of running
        the TCN over B * S rows of L positions, the N real positions of all slots are
        packed into one [N, C] sequence, position-major (`PackedSlots`), and each causal
        convolution tap of shift s is computed only for the rows at position >= s, on
        their inputs s positions earlier in the same slot: exactly the per-slot causal
        convolution with zero left padding, without multiplying the padding zeros.
        Needs the batcher's layout (each slot's items left-aligned). Equal to gathering
        `encode`'s output at the targets. With the chunk context, each slot's context
        rows come first, and each conv is computed only at the rows that a later one or
        a target reads (`PackedSlots.rows_from`): the last conv at the chunk's rows only.

        Returns:
          (user vectors [N, C] at the non-padding targets in the row-major order of
          `tf.where(items > 0)`, the cache after the batch).
        """
        core, context = self._split_context(cache)
        if context is None:
            return self._encode_packed(batch, core, None, training)
        if not self.reads_chunk_context:  # (no session of the data is longer than L)
            return self._encode_packed(batch, core, None, training, context)
        return self._encode_packed(batch, core, context, training)

    def _encode_packed(self, batch, cache, context, training, unchanged=None):
        """`encode_events` on the cache without its context and the context (None: none
        read; `unchanged` then goes on the cache after the batch, when not None)."""
        items = tf.cast(batch["items"], tf.int64)
        b, s = tf.shape(items)[0], items.shape[1]
        if context is None:
            packed = PackedSlots(tf.reshape(items, [b * s, -1]))
            target = None
        else:
            # each slot's context rows come first; only the rows after them are targets
            seq, lengths, after = self._chunk_inputs(items, batch, context)
            packed = PackedSlots(seq)
            target = packed.pos >= tf.gather(lengths, packed.slot)   # [N]
        emb = self.item_embedding(packed.items)                      # targets [N, E]
        state_dim = self.state_size
        if self.config.high_level or self.config.session_summary:
            weight = (tf.ones_like(packed.slot, tf.float32) if target is None
                      else tf.cast(target, tf.float32))
            sums = tf.math.unsorted_segment_sum(tf.cast(emb, tf.float32) * weight[:, None],
                                                packed.slot, b * s)
            counts = tf.math.unsorted_segment_sum(weight, packed.slot, b * s)
            before, carried_sums, carried_counts, new_cache = self._states_from_sums(
                tf.reshape(sums, [b, s, -1]), tf.reshape(counts, [b, s]),
                batch["reset"], batch["session_end"], cache, items[:, :, 0])
            before = tf.reshape(before, [-1, state_dim])
        else:
            before = tf.zeros([b * s, state_dim])
            new_cache = self._carried_count(items, batch, cache)
        proj = self.input_projection
        kernel = tf.cast(proj.kernel, emb.dtype)
        e = emb.shape[-1]
        # Inputs [start, a1 .. a(m-1)] per slot: the position-0 rows come first.
        first = tf.broadcast_to(tf.cast(proj.start, emb.dtype), tf.stack([packed.start(1), e]))
        inputs = tf.concat([first, packed.shift(emb, 1)], axis=0)
        x = (tf.matmul(inputs, kernel[:e])
             + tf.gather(tf.matmul(tf.cast(before[:, :self.gru_size], emb.dtype), kernel[e:]),
                         packed.slot))
        if self.summary_projection is not None:
            # the mean of the session's items before each event: earlier chunks (carried)
            # and this slot's earlier positions
            # (the carried part holds the slot's context rows, which come first: the
            # sums before a row are the carried ones less the context's plus the rows'
            # before it)
            slot_sums = tf.reshape(carried_sums, [b * s, -1])
            slot_counts = tf.reshape(carried_counts, [-1])
            if target is not None:
                slot_sums -= tf.math.unsorted_segment_sum(
                    tf.cast(emb, tf.float32) * tf.cast(~target, tf.float32)[:, None],
                    packed.slot, b * s)
                slot_counts -= tf.cast(lengths, tf.float32)
            x += self._summary(tf.gather(slot_sums, packed.slot)
                               + packed.exclusive_sum(tf.cast(emb, tf.float32)),
                               tf.gather(slot_counts, packed.slot)
                               + tf.cast(packed.pos, tf.float32), emb.dtype)
        if target is None:
            for block in self.blocks:
                x = packed_block(block, x, packed, training)
            user = packed.to_row_major(tf.cast(x, tf.float32))
            return user, (new_cache if unchanged is None else new_cache + (unchanged,))
        # Only the chunk's rows are targets, and each conv needs its output only where a
        # later one reads it: at positions >= the context's length less the positions the
        # later convs look back.
        looks = [[(conv.kernel_size[0] - 1) * conv.dilation_rate[0]
                  for conv in block.conv_layers] for block in self.blocks]
        later = sum(sum(look) for look in looks)   # the look-back after a conv
        rows = None                                 # (the first conv reads every row)
        for block, look in zip(self.blocks, looks):
            outs = []
            for back in look:
                later -= back
                outs.append(packed.rows_from(lengths - later))
            x = packed_block(block, x, packed, training, [rows, *outs])
            rows = outs[-1]
        return rows.to_row_major(tf.cast(x, tf.float32)), new_cache + (after,)


# `_log_norm_off`: the catalogue probability of the current item above which the normaliser
# without it is summed, not taken from the probability.
SURE = 0.99


def _log_sum_by_item(log_att: tf.Tensor, context: tf.Tensor) -> tf.Tensor:
    """float32 [B, P, M]: at each context position, the log of the attention [B, P, M]
    summed over the row's positions holding the same item (`context` int64 [B, M]), a
    log-sum-exp per item (the sum of exp(attention) underflowed below e^-87 where training's
    log-sum-exp did not: an item's score then fell to the catalogue part's alone)."""
    b, p, m = tf.shape(log_att)[0], tf.shape(log_att)[1], tf.shape(log_att)[2]
    # each position's group: the first position of the row holding its item
    first = tf.argmax(tf.cast(tf.equal(context[:, :, None], context[:, None, :]), tf.int32),
                      axis=2, output_type=tf.int32)                                  # [B, M]
    rows = tf.range(b * p)[:, None] * m                                         # [B * P, 1]
    group = rows + tf.reshape(tf.broadcast_to(first[:, None, :], [b, p, m]), [b * p, m])
    flat = tf.reshape(log_att, [b * p, m])
    top = tf.stop_gradient(tf.gather(tf.math.unsorted_segment_max(flat, group, b * p * m),
                                     group))
    total = tf.math.unsorted_segment_sum(tf.exp(flat - top), group, b * p * m)
    return tf.reshape(top + tf.math.log(tf.gather(total, group)), [b, p, m])


def _right_aligned(history: tf.Tensor) -> tf.Tensor:
    """int64 [B, N']: the known items of each row moved to the end in their order, pads
    (and unknown items) as 0 before them."""
    known = history >= schema.NUM_RESERVED
    n = tf.shape(history)[1]
    order = tf.argsort(tf.where(known, n, 0) + tf.range(n)[None, :], axis=1, stable=True)
    return tf.where(tf.gather(known, order, batch_dims=1), tf.gather(history, order, batch_dims=1),
                    tf.zeros_like(history))


def _last_columns(x: tf.Tensor, width: int) -> tf.Tensor:
    """[B, width]: the last `width` columns of x [B, N'], zeros in front when N' < width."""
    missing = tf.maximum(width - tf.shape(x)[1], 0)
    return tf.pad(x, [[0, 0], [missing, 0]])[:, -width:]


def _first_true(mask: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
    """int32 [B, K]: the first index along the last axis (of length t) where mask [B, K, t]
    holds, t where it never does."""
    index = tf.where(mask, tf.range(t)[None, None, :], t)
    return tf.minimum(tf.reduce_min(index, axis=2), t)


def _scatter_index(items: tf.Tensor) -> tf.Tensor:
    """[B, P, M, 3] (b, p, items[b, p, m]) for a scatter into [B, P, V]."""
    b, p, m = tf.shape(items)[0], tf.shape(items)[1], tf.shape(items)[2]
    return tf.stack([tf.broadcast_to(tf.range(b, dtype=tf.int64)[:, None, None], [b, p, m]),
                     tf.broadcast_to(tf.range(p, dtype=tf.int64)[None, :, None], [b, p, m]),
                     tf.cast(items, tf.int64)], axis=-1)


def _log_complement(log_p: tf.Tensor, exact) -> tf.Tensor:
    """log(1 - p) [...] from log p [...]: log1p(-p) where p <= SURE, and where p is more
    (1 - p lost to float32) `exact(rows)` [K], the caller's sum over the other items for
    those rows alone (`rows` int64 [K, rank] indices of `log_p`)."""
    log_sure = np.log(SURE)
    off = tf.math.log1p(-tf.exp(tf.minimum(log_p, log_sure)))
    rows = tf.where(log_p > log_sure)
    return tf.tensor_scatter_nd_update(off, rows, exact(rows))


def _rows_with(rows: tf.Tensor, columns: tf.Tensor, values: tf.Tensor, add: bool = False
               ) -> tf.Tensor:
    """rows [K, V] with `values` [K, C] set at (or with `add`, added to) the columns
    `columns` int64 [K, C] of each row (a column given twice: the same value, or both
    added)."""
    k = tf.shape(columns, out_type=tf.int64)[0]
    columns = tf.cast(columns, tf.int64)
    index = tf.stack([tf.broadcast_to(tf.range(k)[:, None], tf.shape(columns, tf.int64)),
                      columns], axis=-1)
    scatter = tf.tensor_scatter_nd_add if add else tf.tensor_scatter_nd_update
    return scatter(rows, index, values)


def _with_context(context: tf.Tensor, items: tf.Tensor):
    """(int64 [R, K + L] each row's context items (`context` [R, K], newest last, 0 in
    front) followed by its items (`items` [R, L], left-aligned), left-aligned; int64 [R] the
    context lengths)."""
    context = tf.cast(context, tf.int64)
    lengths = tf.reduce_sum(tf.cast(context > 0, tf.int64), axis=1)
    both = tf.concat([context, tf.cast(items, tf.int64)], axis=1)   # 0s, context, items, 0s
    width = tf.shape(both, out_type=tf.int64)[1]
    index = (tf.range(width)[None, :] + tf.shape(context, out_type=tf.int64)[1]
             - lengths[:, None])
    return (tf.where(index < width, tf.gather(both, tf.minimum(index, width - 1), batch_dims=1),
                     tf.zeros_like(both)), lengths)


def _take_rows(x: tf.Tensor, src: tf.Tensor, dst: tf.Tensor) -> tf.Tensor:
    """x[src] for an injective `src`, with the transposed gather as its gradient.

    Args:
      x: [N, C].
      src: int [M] distinct rows of x.
      dst: int [N] for each row q of x the output row that reads it (q == src[dst[q]]),
        or M where none does.

    Returns:
      [M, C] x[src]; its gradient g [M, C] flows back as [g; 0][dst] (a gather instead of
      the scatter-add of `tf.gather`'s gradient).
    """
    @tf.custom_gradient
    def take(x):
        def grad(g):
            return tf.gather(tf.concat([g, tf.zeros([1, tf.shape(g)[1]], g.dtype)], 0), dst)
        return tf.gather(x, src), grad

    return take(x)


class PackedSlots:
    """The real events of [R, L] left-aligned slots, packed position-major.

    Row order: all position-0 events (slots in order), then all position-1 events, and so
    on, so the rows at position >= s are a suffix of the N rows. Attributes: `items`,
    `slot`, `pos` int64 [N] per packed row.
    """

    def __init__(self, flat_items: tf.Tensor):
        """Packs.

        Args:
          flat_items: int64 [R, L], each row's items left-aligned, 0 pads at the end.
        """
        flat = tf.convert_to_tensor(flat_items, tf.int64)
        where = tf.where(tf.transpose(flat) > 0)                     # (pos, slot) [N, 2]
        self.pos, self.slot = where[:, 0], where[:, 1]
        self.size = tf.shape(where, out_type=tf.int64)[0]
        self.items = tf.gather_nd(flat, tf.reverse(where, [1]))
        # packed row of (pos, slot), for finding each row's input s positions earlier
        self._row = tf.scatter_nd(where, tf.range(self.size),
                                  tf.shape(tf.transpose(flat), out_type=tf.int64))
        self._per_pos = tf.reduce_sum(tf.cast(flat > 0, tf.int64), axis=0)     # [L]
        row_major = tf.where(flat > 0)
        self._row_major_slot = row_major[:, 0]                           # ascending
        self._order = tf.gather_nd(self._row, tf.reverse(row_major, [1]))
        self._inverse = tf.math.invert_permutation(self._order)
        self._shifts = {}

    def start(self, shift: int) -> tf.Tensor:
        """int64 scalar: the first packed row at position >= shift."""
        return tf.reduce_sum(self._per_pos[:shift])

    def shift(self, x: tf.Tensor, shift: int, source: PackedRows | None = None,
              target: PackedRows | None = None) -> tf.Tensor:
        """[N, C] -> [N - start(shift), C]: for each row at position >= shift, the row
        `shift` positions earlier in the same slot.

        With `source` and/or `target` (`rows_from`; None: all rows), x holds the source
        rows and the result is for the target rows at position >= shift, [M -
        target.start(shift), C]; the rows they read must be among the source rows.
        """
        key = (shift, id(source), id(target))
        if key not in self._shifts:
            into = self if target is None else target
            a = into.start(shift)
            src = tf.gather_nd(self._row, tf.stack([into.pos[a:] - shift, into.slot[a:]], 1))
            size = self.size
            if source is not None:
                src, size = tf.gather(source.of, src), source.size
            dst = tf.tensor_scatter_nd_update(tf.fill([size], into.size - a), src[:, None],
                                              tf.range(into.size - a))
            self._shifts[key] = (src, dst, source, target)   # (kept alive: ids are keys)
        return _take_rows(x, *self._shifts[key][:2])

    def rows_from(self, first: tf.Tensor) -> PackedRows:
        """The rows of each slot r at positions >= first[r] (int64 [R])."""
        return PackedRows(self, first)

    def exclusive_sum(self, x: tf.Tensor) -> tf.Tensor:
        """[N, C] -> [N, C]: for each row, the sum of x over its slot's earlier positions.

        In row-major order a slot's rows are consecutive, so this is one cumulative sum
        minus its value at the slot's first row.
        """
        total = tf.cumsum(self.to_row_major(x), axis=0, exclusive=True)
        slot = self._row_major_slot
        first = tf.gather(tf.math.segment_min(tf.range(self.size), slot), slot)
        return tf.gather(total - tf.gather(total, first), self._inverse)

    @property
    def row_major_order(self) -> tf.Tensor:
        """int [N]: the packed row of each entry of `tf.where(flat_items > 0)`."""
        return self._order

    def to_row_major(self, x: tf.Tensor) -> tf.Tensor:
        """[N, C] packed rows -> [N, C] in the row-major order of `tf.where(flat_items > 0)`."""
        return _take_rows(x, self._order, self._inverse)


class PackedRows:
    """A subset of a `PackedSlots`' rows, in packed order (position-major): those of each
    slot r at positions >= first[r]. Its rows at position >= s are again a suffix.
    Attributes: `index` (the packed rows), `pos`, `slot` int64 [M]; `size` M; `of` int64
    [N] each packed row's place among them (M where not one of them).
    """

    def __init__(self, packed: PackedSlots, first: tf.Tensor):
        keep = packed.pos >= tf.gather(tf.cast(first, tf.int64), packed.slot)
        self.index = tf.where(keep)[:, 0]
        self.size = tf.shape(self.index, out_type=tf.int64)[0]
        self.pos = tf.gather(packed.pos, self.index)
        self.slot = tf.gather(packed.slot, self.index)
        self.of = tf.tensor_scatter_nd_update(tf.fill([packed.size], self.size),
                                              self.index[:, None], tf.range(self.size))
        self._packed = packed

    def start(self, shift: int) -> tf.Tensor:
        """int64 scalar: the first of these rows at position >= shift."""
        return tf.reduce_sum(tf.cast(self.pos < shift, tf.int64))

    def to_row_major(self, x: tf.Tensor) -> tf.Tensor:
        """[M, C] these rows -> [M, C] in the row-major order (slot, then position)."""
        order = tf.gather(self.of, self._packed.row_major_order)    # M where not here
        order = tf.boolean_mask(order, order < self.size)
        return _take_rows(x, order, tf.math.invert_permutation(order))


def packed_causal_conv(x: tf.Tensor, packed: PackedSlots, conv: tf.keras.layers.Conv1D,
                       source: PackedRows | None = None,
                       target: PackedRows | None = None) -> tf.Tensor:
    """A causal dilated Conv1D layer applied to packed slots.

    Tap i of the kernel reads the input (k - 1 - i) d positions back; a row at an earlier
    position would read the zero left padding, so each tap is one matmul over only the
    rows it reaches (a suffix of the packed rows) and its product is added there.

    Args:
      x: [N, C_in] packed rows (`PackedSlots` order), or the `source` rows [M, C_in].
      packed: the layout of x.
      conv: a built causal `Conv1D` (kernel [k, C_in, C_out]); its weights are used.
      source, target: None, or the rows x holds and the rows to compute the output at
        (`PackedSlots.rows_from`; the rows that the target rows read must be source rows).

    Returns:
      [N, C_out] (or [M_target, C_out]) = conv over each slot alone (zero left padding),
      activation included.
    """
    k, d = conv.kernel_size[0], conv.dilation_rate[0]
    kernel = tf.unstack(tf.cast(conv.kernel, x.dtype))
    into = packed if target is None else target
    same = source is target
    parts = [tf.matmul(x if same else packed.shift(x, 0, source, target), kernel[k - 1])]
    for i in range(k - 1):
        shift = (k - 1 - i) * d
        part = tf.matmul(packed.shift(x, shift, source, target), kernel[i])
        parts.append(tf.pad(part, [[into.start(shift), 0], [0, 0]]))
    y = tf.add_n(parts)
    if conv.use_bias:
        y = tf.nn.bias_add(y, tf.cast(conv.bias, x.dtype))
    return conv.activation(y)


def packed_block(block: layers.TemporalBlock, x: tf.Tensor, packed: PackedSlots,
                 training, rows=None) -> tf.Tensor:
    """`TemporalBlock.call` on packed slots ([N, C_in] -> [N, C]); see
    `packed_causal_conv`. `rows`: None (all rows throughout), or the rows x holds followed
    by the rows to compute each conv's output at (`PackedSlots.rows_from`; None: all);
    the block's output is then at the last ones."""
    rows = rows or [None] * (len(block.conv_layers) + 1)
    y = x
    for conv, source, target in zip(block.conv_layers, rows, rows[1:]):
        y = block.drop(packed_causal_conv(y, packed, conv, source, target), training=training)
    res = x if rows[0] is rows[-1] else packed.shift(x, 0, rows[0], rows[-1])
    if block.shortcut is not None:
        kernel = tf.cast(block.shortcut.kernel[0], x.dtype)
        res = tf.nn.bias_add(tf.matmul(res, kernel), tf.cast(block.shortcut.bias, x.dtype))
    return tf.nn.relu(y + res)
