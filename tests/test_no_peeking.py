"""No model sees what it is asked to predict, through the evaluator's own path.

Every rank `model.evaluate.evaluate` computes for an event must equal the rank recomputed
from a reference that cannot see the event: the state built from the user's history and
earlier target sessions only, and the session cut after the event with a decoy (an
unknown item, or another known one) in the target's place. So the target itself, later
positions, later sessions and other users' events cannot have shaped the rank. Checked for
every evaluated model, the neural ones with random weights of a large scale (so that no
path, the seen bias or the start items say, hides behind a weight near zero), in the
evaluator's default blocks and in blocks of two positions; unknown items in the test
sessions exercise the history buffer's handling of them. A scorer that peeks at its target
fails the same check (the check can fail)."""
import numpy as np
import pytest
import tensorflow as tf

from model import base, baselines, keras_scorer, metrics, registry
from model import evaluate as evaluate_lib
from model.base import Scorer
from model.keras_scorer import KerasScorer
from pipeline import schema
from tiny_logs import planted_users, write_data

NUM_ITEMS = 20
NEURAL = {
    # small windows, so that an off-by-one at a window's edge shows
    "hiertcn": {"embedding_dim": 8, "gru_units": 4, "channels": 8, "kernel_size": 3,
                "num_blocks": 2, "history_size": 6, "repeat_window": 3, "start_items": 2,
                "dropout": 0.0},
    "hiertcn:plain": {"embedding_dim": 8, "gru_units": 4, "channels": 8, "kernel_size": 2,
                      "repeat_head": False, "dropout": 0.0},
    "hrnn": {"embedding_dim": 8, "session_units": 8, "user_units": 4},
    "gru4rec": {"embedding_dim": 8, "units": 8},
    "tcn": {"embedding_dim": 8, "channels": [8, 8], "kernel_size": 2, "history_length": 5},
}


def _with_unknown(users, seed):
    """About 30% of the items replaced by the unknown item (index 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for user in users:
        out.append([[1 if rng.random() < 0.3 else i for i in s] for s in user])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("peek") / "data")
    valid = [(3, u) for u in _with_unknown(planted_users(4, NUM_ITEMS, seed=1), 1)]
    test = [(3, u) for u in _with_unknown(planted_users(6, NUM_ITEMS, sessions=5, seed=2), 2)]
    return write_data(path, NUM_ITEMS, planted_users(30, NUM_ITEMS), valid=valid, test=test)


class _Recorder(Scorer):
    """The scorer as the evaluator drives it, recording each rank by (user, session, position)."""

    def __init__(self, inner: Scorer):
        self.inner, self.name, self.ranked = inner, inner.name, {}

    def initial_state(self, user_ids):
        self.ids, self.session = list(user_ids), 0
        return self.inner.initial_state(user_ids)

    def score(self, state, sessions):
        return self.inner.score(state, sessions)

    def update(self, state, sessions):
        return self.inner.update(state, sessions)

    def ranks(self, state, sessions, vocab_size):
        ranks = self.inner.ranks(state, sessions, vocab_size)
        for row, user in enumerate(self.ids):
            for p in np.flatnonzero(sessions[row]):
                self.ranked[(user, self.session, int(p))] = float(ranks[row, p])
        self.session += 1
        return ranks


def _reference(scorer: Scorer, data: str) -> dict:
    """Each event's rank from what precedes it only, with two decoys in the target's place
    (None where the decoys give different ranks: the score read the target)."""
    size = schema.read_vocabulary(data).size
    out = {}
    for user in schema.iter_users(data, "test"):
        state = scorer.initial_state([user.user_id])
        for session in user.sessions[:user.num_context_sessions]:
            state = scorer.update(state, np.asarray(session, np.int64)[None])
        for k, session in enumerate(user.sessions[user.num_context_sessions:]):
            session = np.asarray(session, np.int64)
            for p, target in enumerate(session):
                ranks = set()
                for decoy in (1, 2 + (target + 3) % (size - 2)):
                    cut = session[None, :p + 1].copy()
                    cut[0, p] = decoy
                    scores = np.asarray(scorer.score(state, cut))[0, p]
                    ranks.add(float(metrics.ranks(scores[None], session[p:p + 1])[0]))
                out[(user.user_id, k, p)] = ranks.pop() if len(ranks) == 1 else None
            state = scorer.update(state, session[None])
    return out


def _mismatches(scorer: Scorer, data: str, monkeypatch) -> list:
    reference = _reference(scorer, data)
    found = []
    for small in (False, True):
        if small:  # the evaluator's blocks of positions and users at their smallest
            monkeypatch.setattr(base, "SCORE_BUDGET", 2 * (NUM_ITEMS + 2))
            monkeypatch.setattr(keras_scorer, "MAX_POSITIONS", 2)
        recorder = _Recorder(scorer)
        evaluate_lib.evaluate(recorder, data, "test", progress=False)
        assert set(recorder.ranked) == set(reference)
        found += [(key, rank, reference[key]) for key, rank in recorder.ranked.items()
                  if reference[key] != rank]
    monkeypatch.undo()
    return found


def _neural(name: str, data: str) -> KerasScorer:
    base_name = name.split(":")[0]
    config = registry.config_classes()[base_name]().replace(NEURAL[name])
    tf.keras.utils.set_random_seed(3)
    counts = schema.read_vocabulary(data).counts
    model = registry.build_model(base_name, config, NUM_ITEMS + 2, item_counts=counts)
    rng = np.random.default_rng(7)
    for v in model.variables:
        v.assign(tf.cast(rng.normal(0.0, 0.7, v.shape), v.dtype))
    return KerasScorer(model, name)


@pytest.mark.parametrize("name", sorted(NEURAL) + sorted(baselines.NAMES))
def test_every_rank_comes_from_what_precedes_the_event(data, monkeypatch, name):
    scorer = _neural(name, data) if name in NEURAL else baselines.fit(name, data)
    assert _mismatches(scorer, data, monkeypatch) == []


class _Peeking(Scorer):
    """Session popularity that also counts the item it is asked to predict."""

    name = "peeking"

    def initial_state(self, user_ids):
        return np.zeros(len(user_ids))

    def update(self, state, sessions):
        return state

    def score(self, state, sessions):
        scores = np.zeros(sessions.shape + (NUM_ITEMS + 2,), np.float32)
        for row, session in enumerate(sessions):
            for p, item in enumerate(session):
                scores[row, p:, item] += 1.0  # position p sees its own target
        return scores


def test_a_scorer_that_peeks_fails_the_check(data, monkeypatch):
    assert len(_mismatches(_Peeking(), data, monkeypatch)) > 50
