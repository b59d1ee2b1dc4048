"""model.baselines on hand-made sessions: hand-computed neighbours, scores and rankings."""
import json

import numpy as np
import pytest
import scipy.sparse as sp

from model import baselines
from model import evaluate as ev
from model import metrics
from model.base import popularity_term
from pipeline import schema
from test_evaluate import write_data

V = 12
COUNTS = np.arange(V, 0, -1)  # item 2 most popular, then 3, 4, ...
REST = list(range(2, V))


def ranking(scores):
    """Items 2.. ordered by descending score (stable: equal scores keep index order)."""
    return list(np.argsort(-scores[2:], kind="stable") + 2)


def then_rest(*items):
    return list(items) + [i for i in REST if i not in items]


@pytest.fixture(scope="module")
def knn_data(tmp_path_factory):
    # Train sessions in read order u1: s0 [2,3] @0, s2 [2,4] @10000; u2: s1 [3,4,5] @5000,
    # s3 [6,7] @15000. By time of the last event: s0, s1, s2, s3 (oldest first).
    train = {"u1": ([], [[2, 3], [2, 4]], 0), "u2": ([], [[3, 4, 5], [6, 7]], 5000)}
    return write_data(tmp_path_factory.mktemp("knn"), {"train": train}, vocab_size=V,
                      counts=list(COUNTS))


def test_sknn_fit_orders_sessions_by_time(knn_data):
    knn = baselines.SessionKNN.fit(knn_data)
    rows = [list(knn.sessions[i].indices) for i in range(4)]
    assert rows == [[2, 3], [3, 4, 5], [2, 4], [6, 7]]


@pytest.mark.parametrize("k, sample_size, expected", [
    # Prefix [2, 4]: weights 1/2 and 1 (stored x2: 1 and 2). Similarities x2: s0 {2} 1,
    # s1 {4} 2, s2 {2,4} 3, s3 0 (not a candidate).
    # k=2: neighbours s2 (3), s1 (2): item 2: 3, 3: 2, 4: 3+2, 5: 2.
    (2, 500, {2: 3, 3: 2, 4: 5, 5: 2}),
    # The 2 most recent sessions sharing an item are s2 and s1: the same neighbours.
    (100, 2, {2: 3, 3: 2, 4: 5, 5: 2}),
    # All three candidates: s0 adds 1 to items 2 and 3.
    (100, 500, {2: 4, 3: 3, 4: 5, 5: 2}),
    # k=1: s2 only.
    (1, 500, {2: 3, 4: 3}),
])
def test_sknn_neighbours_and_scores(knn_data, k, sample_size, expected):
    knn = baselines.SessionKNN.fit(knn_data, k=k, sample_size=sample_size)
    scores = knn.score(None, np.array([[2, 4, 9]]))
    want = np.zeros(V)
    for item, s in expected.items():
        want[item] = s
    np.testing.assert_allclose(scores[0, 2] - knn.pop, want, atol=1e-5)
    # Position 0 is popularity; ties in the kNN score go to the more popular item.
    assert ranking(scores[0, 0]) == REST
    assert ranking(scores[0, 2]) == then_rest(*sorted(expected, key=lambda i: (-expected[i], i)))


def test_sknn_equal_similarity_prefers_the_recent_session(knn_data):
    # Prefix [3]: s0 and s1 both have similarity 1; k=1 keeps s1 (more recent): 3, 4, 5.
    knn = baselines.SessionKNN.fit(knn_data, k=1)
    scores = knn.score(None, np.array([[3, 2], [2, 0]]))
    np.testing.assert_allclose(scores[0, 1] - knn.pop, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(scores[1], np.broadcast_to(knn.pop, (2, V)))  # nothing to predict


def test_sknn_orders_sessions_by_their_last_event_not_their_start(tmp_path):
    """A long session that starts first and ends last is the newer neighbour: u1's
    [2..11] runs from 0 to 9, u2's [3, 4] from 5 to 6. With equal similarity and k=1 the
    newer one, u1's, is the neighbour (by start it would be u2's)."""
    data = write_data(tmp_path, {"train": {"u1": ([], [list(range(2, 12))], 0),
                                           "u2": ([], [[3, 4]], 5)}},
                      vocab_size=V, counts=list(COUNTS))
    knn = baselines.SessionKNN.fit(data, k=1)
    assert [list(knn.sessions[i].indices) for i in range(2)] == [[3, 4], list(range(2, 12))]
    neighbour = knn.score(None, np.array([[3, 2]]))[0, 1] - knn.pop  # after item 3
    assert sorted(np.flatnonzero(neighbour > 1e-6)) == list(range(2, 12))


def test_sknn_repeated_item_takes_its_latest_weight(knn_data):
    # Prefix [2, 4, 2]: 2 weighs 3 (not 1 + 3), 4 weighs 2: s2 {2,4} 5, s0 {2} 3, s1 {4} 2.
    knn = baselines.SessionKNN.fit(knn_data)
    scores = knn.score(None, np.array([[2, 4, 2, 5]]))
    np.testing.assert_allclose(scores[0, 3, 2:6] - knn.pop[2:6], [5 + 3, 3 + 2, 5 + 2, 2], atol=1e-5)


def test_sknn_chunking_gives_the_same_scores(knn_data, monkeypatch):
    knn = baselines.SessionKNN.fit(knn_data)
    sessions = np.array([[2, 4, 3, 5, 6], [7, 6, 2, 0, 0]])
    full = knn.score(None, sessions)
    monkeypatch.setattr(baselines, "CHUNK_PAIRS", 1)
    np.testing.assert_array_equal(knn.score(None, sessions), full)


def _sknn_by_definition(sessions: list[set], prefix: list[int], k: int, sample_size: int,
                        vocab: int) -> np.ndarray:
    """V-SKNN's item scores (x t, as SessionKNN keeps them) for one prefix, straight from
    its definition: sessions oldest first, weights j of each item's latest position."""
    weight = {item: j + 1 for j, item in enumerate(prefix)}
    sharing = [s for s in range(len(sessions)) if sessions[s] & weight.keys()]
    candidates = sharing[-sample_size:]
    sim = {s: sum(weight[i] for i in sessions[s] & weight.keys()) for s in candidates}
    neighbours = sorted(candidates, key=lambda s: (-sim[s], -s))[:k]
    out = np.zeros(vocab)
    for s in neighbours:
        for item in sessions[s]:
            out[item] += sim[s]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_sknn_equals_its_definition_on_random_sessions(seed):
    """Random sessions over few items (some in most sessions) and small sample sizes,
    where cutting each item's sessions to its most recent ones must change nothing."""
    rng = np.random.default_rng(seed)
    vocab = 14
    popularity = 1.0 / np.arange(1, vocab - 1) ** 1.5
    past = [set(rng.choice(np.arange(2, vocab), size=rng.integers(1, 6),
                           p=popularity / popularity.sum()).tolist()) for _ in range(60)]
    rows = [sorted(s) for s in past]
    matrix = sp.csr_matrix((np.ones(sum(map(len, rows))), np.concatenate(rows),
                            np.concatenate([[0], np.cumsum([len(r) for r in rows])])),
                           shape=(len(rows), vocab))
    counts = rng.integers(1, 50, vocab)
    queries = rng.choice(np.arange(2, vocab), size=(5, 9), p=popularity / popularity.sum())
    queries[1, 6:] = schema.PAD_INDEX  # a shorter session
    for k, sample_size in [(100, 500), (3, 500), (100, 4), (2, 7), (1, 1)]:
        knn = baselines.SessionKNN(matrix, counts, k=k, sample_size=sample_size)
        scores = knn.score(None, queries)
        for r, row in enumerate(queries):
            length = int((row != schema.PAD_INDEX).sum())
            for t in range(1, length):
                want = _sknn_by_definition(past, row[:t].tolist(), k, sample_size, vocab)
                np.testing.assert_allclose(scores[r, t] - knn.pop, want, atol=1e-3,
                                           err_msg=f"k={k} sample_size={sample_size} {row[:t]}")


def test_sknn_without_remind_scores_the_session_items_by_popularity_alone(knn_data):
    """remind=False (session-rec's option): prefix [2, 4] as in the k=2 case above, whose
    neighbour scores were {2: 3, 3: 2, 4: 5, 5: 2}; items 2 and 4 keep only the popularity
    term, so they rank after every item a neighbour holds."""
    knn = baselines.SessionKNN.fit(knn_data, k=2, remind=False)
    assert knn.name == "sknn:noremind"
    scores = knn.score(None, np.array([[2, 4, 9]]))
    want = np.zeros(V)
    want[[3, 5]] = 2
    np.testing.assert_allclose(scores[0, 2] - knn.pop, want, atol=1e-5)
    assert ranking(scores[0, 2])[:2] == [3, 5]
    # position 1 (prefix [2]): s2, s0 are the neighbours; 2 loses its score, 4 and 3 keep theirs
    np.testing.assert_allclose(scores[0, 1, [2, 3, 4]] - knn.pop[[2, 3, 4]], [0, 1, 1], atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 9])
def test_sknn_without_remind_equals_its_definition_in_blocks_of_any_width(width):
    rng = np.random.default_rng(7)
    vocab = 14
    past = [set(rng.choice(np.arange(2, vocab), size=rng.integers(1, 6)).tolist())
            for _ in range(40)]
    rows = [sorted(s) for s in past]
    matrix = sp.csr_matrix((np.ones(sum(map(len, rows))), np.concatenate(rows),
                            np.concatenate([[0], np.cumsum([len(r) for r in rows])])),
                           shape=(len(rows), vocab))
    knn = baselines.SessionKNN(matrix, rng.integers(1, 50, vocab), k=3, remind=False)
    queries = rng.choice(np.arange(2, vocab), size=(4, 9))
    queries[2, 5:] = schema.PAD_INDEX
    scores = np.concatenate(list(knn.score_blocks(None, queries, width)), axis=1)
    for r, row in enumerate(queries):
        for t in range(1, int((row != schema.PAD_INDEX).sum())):
            want = _sknn_by_definition(past, row[:t].tolist(), 3, 500, vocab)
            want[row[:t]] = 0.0  # the session's own items: the popularity term alone
            np.testing.assert_allclose(scores[r, t] - knn.pop, want, atol=1e-3)


def test_remind_is_an_option_of_sknn_only(knn_data, capsys):
    with pytest.raises(ValueError, match="options? of sknn"):
        baselines.fit("upop", knn_data, remind=False)
    with pytest.raises(ValueError, match="options? of sknn"):
        baselines.fit("upop", knn_data, k=5)
    for option, value in (("--no-remind", ()), ("--neighbours", ("5",)),
                          ("--neighbour-sample", ("5",))):
        with pytest.raises(SystemExit):
            ev.main(["--data", knn_data, "--split", "valid", "--model", "upop", option, *value])
        assert f"error: {option} is an option of --model sknn" in capsys.readouterr().err


def test_rule_out_seen_and_rule_out_current_are_one_or_the_other(knn_data, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--data", knn_data, "--split", "valid", "--model", "upop", "--rule-out-seen",
                 "--rule-out-current"])
    assert "pass one of --rule-out-seen and --rule-out-current" in capsys.readouterr().err


def test_popularity():
    pop = baselines.Popularity(COUNTS)
    scores = pop.score(None, np.array([[5, 3]]))
    assert scores.shape == (1, 2, V) and ranking(scores[0, 1]) == REST
    np.testing.assert_array_equal(scores[0, 0], popularity_term(COUNTS))


def test_popularity_tells_apart_counts_float32_cannot():
    """Counts above 2**24 (a top item of a large log): the most popular item ranks first
    (static audit: float32 counts 2**24 + 1 and 2**24 tied, and the conservative rank put
    it second); equal counts still tie; the term of a count of 0 is 0."""
    counts = np.array([0, 0, 2 ** 24 + 1, 2 ** 24, 2 ** 24, 3, 0], np.int64)
    for model in (baselines.Popularity(counts), baselines.SessionPop(counts)):
        scores = model.score(model.initial_state(["u"]), np.array([[6]]))[0, 0]
        assert metrics.ranks(scores[None], np.array([2])).tolist() == [1.0]
        assert metrics.ranks(scores[None], np.array([3])).tolist() == [3.0]  # tied with 4
        assert scores[6] == 0 < scores[5] < scores[4] == scores[3] < scores[2] < 0.5


def test_popularitys_sorted_lookup_gives_the_blocks_ranks():
    """`Popularity.ranks` looks each target up in the sorted scores instead of filling
    [rows, steps, V] blocks: the same ranks as the blocks' (`Scorer.ranks`), ties, padding,
    unknown targets and float32's ties above 2**24 included; with items ruled out it is
    the blocks'."""
    from model import base

    rng = np.random.default_rng(3)
    counts = np.concatenate([[0, 0], rng.integers(0, 6, 300), [2 ** 24 + 1, 2 ** 24]])
    model = baselines.Popularity(counts)
    sessions = rng.integers(1, len(counts), (7, 9))
    sessions[2, 5:] = 0  # padding
    sessions[0, 3] = sessions[4, 0] = 1  # unknown
    blocks = base.Scorer.ranks(model, None, sessions, len(counts))
    fast = model.ranks(None, sessions, len(counts))
    np.testing.assert_array_equal(fast, blocks)
    assert np.isinf(fast[0, 3]) and np.isinf(fast[4, 0]) and fast[2, 6] == 0
    assert model.ranks(None, np.array([[len(counts) - 2]]), len(counts)).tolist() == [[1.0]]
    excluded = metrics.previous_items(sessions)
    np.testing.assert_array_equal(
        model.ranks(None, sessions, len(counts), excluded=excluded),
        base.Scorer.ranks(model, None, sessions, len(counts), excluded=excluded))
    with pytest.raises(ValueError, match="targets must lie in"):  # as the blocks say it
        model.ranks(None, np.array([[len(counts)]]), len(counts))


def test_spop_ranks_session_counts_then_popularity():
    spop = baselines.SessionPop(COUNTS)
    scores = spop.score(None, np.array([[5, 7, 5, 3]]))
    assert ranking(scores[0, 0]) == REST
    assert ranking(scores[0, 1]) == then_rest(5)
    assert ranking(scores[0, 2]) == then_rest(5, 7)  # 1 each: the more popular 5 first
    assert ranking(scores[0, 3]) == then_rest(5, 7)  # 5 twice


def test_mv_window_crosses_sessions_and_padding_keeps_state():
    mv = baselines.MovingAverage(COUNTS, window=3)
    state = mv.update(mv.initial_state(["u", "v"]), np.array([[4, 5, 6, 7], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(state, [[5, 6, 7], [0, 0, 0]])
    np.testing.assert_array_equal(mv.update(state, np.zeros((2, 1), np.int64)), state)
    scores = mv.score(state, np.array([[7, 2, 9], [3, 8, 0]]))
    assert ranking(scores[0, 0]) == then_rest(5, 6, 7)  # 1 each, by popularity
    assert ranking(scores[0, 1]) == then_rest(7, 6)  # window [6, 7, 7]
    assert ranking(scores[0, 2]) == then_rest(7, 2)  # window [7, 7, 2]
    assert ranking(scores[1, 1]) == then_rest(3)


def test_mv_and_upop_give_unknown_items_no_place():
    """An unknown item (1: never a candidate) takes no slot of mv's window and no place or
    age in upop's history, in the state and within the session (as HierTCN's head)."""
    mv = baselines.MovingAverage(COUNTS, window=3)
    state = mv.update(mv.initial_state(["u"]), np.array([[4, 5, 1, 6, 1]]))
    np.testing.assert_array_equal(state, [[4, 5, 6]])
    scores = mv.score(state, np.array([[1, 7, 1, 1, 2]]))
    np.testing.assert_array_equal(scores[0, 0], scores[0, 1])  # window [4, 5, 6] at both
    assert ranking(scores[0, 2]) == then_rest(5, 6, 7)  # window [5, 6, 7]: 1 each
    np.testing.assert_array_equal(scores[0, 2], scores[0, 4])  # the unknowns moved nothing
    upop = baselines.UserPop(COUNTS, decay=0.5, session_weight=2.0, history=3)
    state = upop.update(upop.initial_state(["u"]), np.array([[2, 3, 1, 4, 1, 5]]))
    np.testing.assert_array_equal(state, [[3, 4, 5]])
    scores = upop.score(state, np.array([[5, 1, 3]]))
    # position 1 after the session's 5: 3 1/8, 4 1/4, 5 1/2 + 2; the unknown item before
    # position 2 changes nothing
    np.testing.assert_allclose(scores[0, 1, 3:6], [1.125, 1.25, 3.5])
    np.testing.assert_array_equal(scores[0, 2], scores[0, 1])


def test_mv_default_window_is_ten():
    mv = baselines.MovingAverage(COUNTS)
    state = mv.update(mv.initial_state(["u"]), np.array([[9] + [2, 3] * 5]))
    assert ranking(mv.score(state, np.array([[4]]))[0, 0]) == then_rest(2, 3)  # 9 fell out


def test_upop_recency_weighted_with_session_boost():
    upop = baselines.UserPop(COUNTS, decay=0.5, session_weight=2.0, history=3)
    state = upop.update(upop.initial_state(["u"]), np.array([[2, 3, 4, 5]]))
    np.testing.assert_array_equal(state, [[3, 4, 5]])
    scores = upop.score(state, np.array([[5, 3, 2]]))
    # Position 0: 3, 4, 5 weigh 1/4, 1/2, 1 -> scores 1 + r.
    np.testing.assert_allclose(scores[0, 0, 3:6], [1.25, 1.5, 2.0])
    assert ranking(scores[0, 0]) == then_rest(5, 4, 3)
    # Position 1: history halves, the session's 5 adds 2: 3 1/8, 4 1/4, 5 1/2 + 2.
    np.testing.assert_allclose(scores[0, 1, 3:6], [1.125, 1.25, 3.5])
    # Position 2: 3 1/16 + 2, 4 1/8, 5 5/4: the newest session item leads.
    np.testing.assert_allclose(scores[0, 2, 3:6], [3.0625, 1.125, 2.25])
    assert ranking(scores[0, 2]) == then_rest(3, 5, 4)
    assert scores[0, 2].max() > 1 > 0.5 > scores[0, 2, 6:].max()


def test_fit_rejects_unknown_name(knn_data):
    with pytest.raises(ValueError, match="unknown baseline 'bpr'"):
        baselines.fit("bpr", knn_data)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    train = {"a": ([], [[5, 6], [7, 8], [2, 3, 4]]), "b": ([], [[2, 3], [3, 4, 5]])}
    test = {"a": ([[5, 6], [7, 8], [2, 3, 4], [9, 10]], [[2, 3, 5]]), "b": ([[2, 3]], [[4, 5, 4, 2]])}
    return write_data(tmp_path_factory.mktemp("small"), {"train": train, "test": test}, vocab_size=V,
                      counts=list(COUNTS))


def test_sknn_neighbours_and_sample_size_from_the_command_line(small_data, tmp_path):
    """`model.evaluate --model sknn --neighbours K --neighbour-sample N` is V-SKNN with
    those k and sample size (so that they can be chosen on valid): the metrics of
    SessionKNN(k=1, sample_size=1), which differ from the defaults' here; `--sample` still
    abbreviates `--sample-users` alone."""
    got = {}
    for name, extra in (("small", ["--neighbours", "1", "--neighbour-sample", "1"]),
                        ("default", ["--sample", "2"])):
        out = tmp_path / f"{name}.json"
        assert ev.main(["--data", small_data, "--split", "test", "--model", "sknn",
                        "--output", str(out), "--no-progress", *extra]) == 0
        got[name] = json.loads(out.read_text())
    want = ev.evaluate(baselines.SessionKNN.fit(small_data, k=1, sample_size=1), small_data, "test",
                       progress=False)
    for key in ("recall@5", "mrr@5", "mrr@20"):
        assert got["small"][key] == pytest.approx(want[key])
    assert any(got["small"][key] != pytest.approx(got["default"][key])
               for key in ("recall@5", "mrr@5", "mrr@20"))


def test_popularity_end_to_end_hand_computed(small_data):
    out = ev.evaluate(baselines.fit("popularity", small_data), small_data, "test", progress=False)
    # Rank of item i is i - 1. Positions >= 1: a 3 (2), 5 (4); b 5 (4), 4 (3), 2 (1).
    assert out["events"] == 5 and out["recall@1"] == pytest.approx(1 / 5)
    assert out["recall@5"] == pytest.approx(1.0)
    assert out["mrr@5"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4 + 1 / 3 + 1) / 5)
    # First items: a 2 (1), b 4 (3).
    assert out["first_item"]["mrr@20"] == pytest.approx((1 + 1 / 3) / 2)


def test_spop_end_to_end_hand_computed(small_data):
    out = ev.evaluate(baselines.fit("spop", small_data), small_data, "test", progress=False)
    # a [2,3,5]: after {2} the order is 2, 3, ...: 3 ranks 2; after {2,3}: 2, 3, 4, 5: 4.
    # b [4,5,4,2]: after {4}: 4, 2, 3, 5: 5 ranks 4; after {4,5}: 4 ranks 1; after
    # {4: 2, 5: 1}: 4, 5, 2: 2 ranks 3.
    assert out["recall@1"] == pytest.approx(1 / 5)
    assert out["mrr@20"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4 + 1 + 1 / 3) / 5)


@pytest.mark.parametrize("name", baselines.NAMES)
def test_every_baseline_fits_and_evaluates(small_data, name):
    out = ev.evaluate(baselines.fit(name, small_data), small_data, "test", batch_size=1, progress=False)
    assert out["model"] == name and out["events"] == 5 and out["first_item"]["events"] == 2
    recalls = [out[f"recall@{k}"] for k in (1, 5, 10, 20)]
    assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 1


def _random_sessions(rng, rows, steps, vocab):
    """int64 [rows, steps] with repeats, unknown items (1) and end padding."""
    sessions = rng.integers(1, vocab, size=(rows, steps))
    sessions[rng.random((rows, steps)) < 0.3] = rng.integers(2, 5)  # repeats
    for r, length in enumerate(rng.integers(1, steps + 1, size=rows)):
        sessions[r, length:] = 0
    return sessions


@pytest.mark.parametrize("name", baselines.NAMES)
def test_blocks_of_positions_give_the_whole_scores_and_ranks(knn_data, monkeypatch, name):
    """Each baseline scores a session block by block, carrying its running summary; any
    block width gives the scores and ranks of the whole session."""
    from model import base, metrics

    scorer = baselines.fit(name, knn_data)
    rng = np.random.default_rng(3)
    state = scorer.initial_state(["a", "b", "c"])
    for _ in range(2):  # some history
        state = scorer.update(state, _random_sessions(rng, 3, 6, V))
    sessions = _random_sessions(rng, 3, 23, V)
    sessions[0, :] = rng.integers(2, V, size=23)  # one full row
    whole = scorer.score(state, sessions)
    assert whole.shape == (3, 23, V) and whole.dtype == np.float32
    expected_ranks = metrics.event_ranks(whole.reshape(-1, V), sessions.reshape(-1)).reshape(3, 23)
    for width in (1, 4, 7, 23, 40):
        parts = list(scorer.score_blocks(state, sessions, width))
        assert [p.shape[1] for p in parts] == [b - a for a, b in base.blocks(23, width)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
        monkeypatch.setattr(base, "SCORE_BUDGET", 3 * width * V)  # blocks of `width`
        np.testing.assert_array_equal(scorer.ranks(state, sessions, V), expected_ranks)


@pytest.mark.parametrize("name", baselines.NAMES)
def test_a_long_session_is_ranked_in_bounded_memory(tmp_path, monkeypatch, name):
    """A crawler's session of 3,000 events over 20,000 items: ranking it whole would hold
    [3000, 20000] float32 scores (240 MB); in blocks of the score budget (here 8 MB) the
    peak stays within a few blocks."""
    import tracemalloc

    from model import base

    vocab, steps = 20_000, 3_000
    rng = np.random.default_rng(0)
    train = {f"u{k}": ([], [list(rng.integers(2, vocab, size=5)) for _ in range(4)])
             for k in range(50)}
    data = write_data(tmp_path, {"train": train}, vocab_size=vocab,
                      counts=list(rng.integers(1, 100, size=vocab)))
    scorer = baselines.fit(name, data)
    session = rng.integers(2, 200, size=(1, steps))  # many repeats: V-SKNN's prefixes stay small
    state = scorer.initial_state(["crawler"])
    monkeypatch.setattr(base, "SCORE_BUDGET", 1 << 21)
    expected = scorer.ranks(state, session[:, :200], vocab)  # a prefix, for the values
    tracemalloc.start()
    try:
        rank = scorer.ranks(state, session, vocab)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rank.shape == (1, steps) and np.isfinite(rank).all() and (rank >= 1).all()
    np.testing.assert_array_equal(rank[:, :200], expected)
    assert peak < 3 * 4 * (1 << 21), peak  # 24 MB, a tenth of the whole scores
