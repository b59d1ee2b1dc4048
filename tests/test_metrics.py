"""model.metrics: conservative ranks, unknown targets, repeat/new and first-item groups."""
import numpy as np
import pytest

from model import metrics

# Columns: 0 pad, 1 unknown, then items 2..5. The reserved columns score highest on
# purpose: they must never count as candidates.
SCORES = np.array([
    [9.0, 9.0, 0.5, 0.9, 0.5, 0.1],
    [9.0, 9.0, 0.5, 0.9, 0.5, 0.1],
    [9.0, 9.0, 0.5, 0.9, 0.5, 0.1],
    [9.0, 9.0, 0.5, 0.9, 0.5, 0.1],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
], dtype=np.float32)


def test_rank_is_conservative_on_ties_and_ignores_reserved_columns():
    # target 3 (0.9): nothing else >= 0.9 -> 1; target 2 (0.5): items 3 (0.9) and 4 (0.5,
    # the tie) -> 3; target 4 likewise 3; target 5 (0.1): all three others -> 4;
    # all-equal scores: the three others tie -> 4; unknown target -> inf.
    r = metrics.ranks(SCORES[[0, 1, 2, 3, 4, 4]], np.array([3, 2, 4, 5, 2, 1]))
    np.testing.assert_array_equal(r, [1, 3, 3, 4, 4, np.inf])


def test_an_excluded_item_leaves_the_candidates():
    # row 0, target 2 (0.5): 3 (0.9) and 4 (the tie) above it -> 3; without 3 -> 2, without
    # 4 -> 2, without 5 (below it) -> 3, without an unknown or padding item -> 3; target 3
    # excluded -> a miss (inf); an unknown target stays inf
    r = metrics.ranks(SCORES[[0, 0, 0, 0, 0, 0, 0, 0]], np.array([2, 2, 2, 2, 2, 2, 3, 1]),
                      excluded=np.array([3, 4, 5, 1, 0, 2, 3, 4]))
    np.testing.assert_array_equal(r[:5], [2, 2, 3, 3, 3])
    assert r[5] == np.inf and r[6] == np.inf and r[7] == np.inf  # (2 is its own target)
    # padding rows of event_ranks stay 0; the same as ranks on the other rows
    e = metrics.event_ranks(SCORES[[0, 0, 0]], np.array([2, 0, 5]), excluded=np.array([3, 9, 2]))
    np.testing.assert_array_equal(e, [2, 0, 3])
    np.testing.assert_array_equal(metrics.previous_items(np.array([[4, 5, 6], [7, 0, 0]])),
                                  [[0, 4, 5], [0, 7, 0]])


def test_masked_items_leave_the_candidates_and_a_masked_target_is_a_ruled_out_miss():
    # row 0, target 2 (0.5): 3 (0.9) and 4 (the tie) above it; masked 3 -> 2, masked 3
    # and 4 -> 1, masked reserved columns change nothing -> 3; a masked target -> inf
    masked = np.zeros((4, 6), bool)
    masked[0, 3] = masked[1, [3, 4]] = masked[2, [0, 1]] = masked[3, 2] = True
    r = metrics.ranks(SCORES[[0, 0, 0, 0]], np.array([2, 2, 2, 2]), masked=masked)
    np.testing.assert_array_equal(r, [2, 1, 3, np.inf])
    with pytest.raises(ValueError, match="masked must be"):
        metrics.ranks(SCORES[[0]], np.array([2]), masked=masked)
    # the accumulator counts unknown targets by the target, not by the miss: a ruled-out
    # target (a miss as well) is not an unknown one
    acc = metrics.MetricsAccumulator()
    acc.add_ranks(np.array([1.0, r[3], np.inf]), np.array([3, 2, 1]),
                  np.zeros(3, bool), np.zeros(3, bool))
    out = acc.result()
    assert out["events"] == 3 and out["unknown_targets"] == 1
    assert out["recall@20"] == pytest.approx(1 / 3)


def test_an_item_both_excluded_and_masked_leaves_the_candidates_once():
    """Row 0, target 2 (0.5) below 3 (0.9) and tied with 4: excluding and masking 3 gives
    rank 2 as either alone does; 4 excluded and 3 masked, rank 1 (property-based audit:
    an item both excluded and masked was taken out twice, a rank of 1 became 0)."""
    masked = np.zeros((3, 6), bool)
    masked[0, 3] = masked[1, 3] = masked[2, 4] = True
    r = metrics.ranks(SCORES[[0, 0, 0]], np.array([2, 2, 2]), excluded=np.array([3, 4, 3]),
                      masked=masked)
    np.testing.assert_array_equal(r, [2, 1, 1])


def test_seen_items_rule_out_earlier_items_from_the_position_after_them():
    # row 0: 4 and 7 seen before (1 unknown, 0 padding, 4 twice: once), then the session
    # 5 4 6 5: 5 from position 1 on, 6 from 3 on (4 was seen before; 5 again: once)
    items, since = metrics.seen_items([np.array([4, 1, 0, 7, 4]), np.array([], np.int64)],
                                      np.array([[5, 4, 6, 5], [3, 1, 0, 0]]))
    assert [dict(zip(i[i > 0].tolist(), s[i > 0].tolist())) for i, s in zip(items, since)] == [
        {4: -1, 7: -1, 5: 0, 6: 2}, {3: 0}]
    mask = metrics.seen_mask(items, since, 1, 4, 8)  # positions 1, 2, 3
    assert [sorted(np.flatnonzero(m).tolist()) for m in mask[0]] == [[4, 5, 7], [4, 5, 7],
                                                                     [4, 5, 6, 7]]
    assert [sorted(np.flatnonzero(m).tolist()) for m in mask[1]] == [[3], [3], [3]]


def test_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        metrics.ranks(np.array([[0, 0, np.nan, 1.0]]), np.array([3]))
    with pytest.raises(ValueError, match="targets must lie"):
        metrics.ranks(np.zeros((1, 4)), np.array([4]))


def test_accumulator_groups_and_micro_averages():
    acc = metrics.MetricsAccumulator()
    # Ranks 1 (first item), 3 (repeat), 4 (new), unknown (new), padding row (skipped).
    # The first three events are a cold user's.
    acc.add(SCORES[[0, 1, 3, 2, 4]], np.array([3, 2, 5, 1, 0]),
            np.array([True, True, False, True, True]), np.array([True, False, False, False, False]),
            is_cold=np.array([True, True, True, False, False]))
    # Split across calls on purpose: a second batch with rank 1 (new).
    acc.add(SCORES[:1], np.array([3]), np.array([False]), np.array([False]),
            is_cold=np.array([False]))
    out = acc.result()
    assert set(out) == set(metrics.METRIC_KEYS) | set(metrics.COUNT_KEYS) | set(metrics.GROUPS)
    # Headline: ranks 3, 4, inf, 1 over 4 events.
    assert out["events"] == 4 and out["unknown_targets"] == 1
    assert out["recall@1"] == pytest.approx(1 / 4)
    assert out["recall@5"] == pytest.approx(3 / 4)
    assert out["recall@20"] == pytest.approx(3 / 4)
    assert out["mrr@1"] == pytest.approx(1 / 4)
    assert out["mrr@5"] == pytest.approx((1 / 3 + 1 / 4 + 1) / 4)
    assert out["first_item"] == {**{k: 1.0 for k in metrics.METRIC_KEYS},
                                 "events": 1, "unknown_targets": 0}
    # The unknown target is flagged repeat=True by the caller, yet counts where flagged.
    rep = out["repeat"]
    assert rep["events"] == 2 and rep["unknown_targets"] == 1
    assert rep["recall@5"] == pytest.approx(1 / 2) and rep["mrr@5"] == pytest.approx(1 / 6)
    new = out["new"]
    assert new["events"] == 2 and new["unknown_targets"] == 0
    assert new["recall@1"] == pytest.approx(1 / 2) and new["mrr@5"] == pytest.approx((1 / 4 + 1) / 2)
    # By user, headline events only: cold ranks 3, 4 (its first item is not headline);
    # returning: the unknown target and rank 1.
    cold, returning = out["cold_users"], out["returning_users"]
    assert cold["events"] == 2 and cold["unknown_targets"] == 0
    assert cold["recall@1"] == 0.0 and cold["recall@5"] == 1.0
    assert cold["mrr@5"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert returning["events"] == 2 and returning["unknown_targets"] == 1
    assert returning["recall@1"] == pytest.approx(1 / 2) and returning["mrr@20"] == pytest.approx(1 / 2)
    for key in metrics.METRIC_KEYS:  # the two user groups partition the headline events
        assert out[key] == pytest.approx((cold[key] * 2 + returning[key] * 2) / 4)


def test_user_groups_need_the_cold_flag_of_every_batch():
    acc = metrics.MetricsAccumulator()
    acc.add(SCORES[:1], np.array([3]), np.array([False]), np.array([False]))
    assert set(acc.result()) & set(metrics.USER_GROUPS) == set()  # not given: not reported
    acc.add(SCORES[:1], np.array([3]), np.array([False]), np.array([False]),
            is_cold=np.array([True]))
    with pytest.raises(ValueError, match="some batches only"):
        acc.result()


def test_empty_accumulator_reports_zero_events():
    out = metrics.MetricsAccumulator().result()
    assert out["events"] == 0 and out["recall@20"] == 0.0 and out["new"]["events"] == 0


def test_chunked_ranks_match_unchunked(monkeypatch):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(50, 12)).astype(np.float32)
    targets = rng.integers(1, 12, size=50)
    full = metrics.ranks(scores, targets)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 24)  # two rows at a time
    np.testing.assert_array_equal(metrics.ranks(scores, targets), full)
    brute = [np.inf if t == 1 else 1 + sum(scores[i, c] >= scores[i, t] for c in range(2, 12) if c != t)
             for i, t in enumerate(targets)]
    np.testing.assert_array_equal(full, brute)


def test_per_user_sums_add_up_to_the_headline_metrics():
    rng = np.random.default_rng(3)
    acc = metrics.MetricsAccumulator()
    for start in (0, 4):  # two batches of users, as the evaluator adds them
        n = 40
        rank = rng.integers(1, 30, size=n).astype(np.float64)
        rank[rng.random(n) < 0.1] = np.inf  # unknown targets: misses
        targets = np.where(rng.random(n) < 0.1, 0, 5)  # some padding rows
        user = start + rng.integers(0, 4, size=n)
        acc.add_ranks(rank, targets, rng.random(n) < 0.5, rng.random(n) < 0.2, user)
    out = acc.result()
    sums = acc.per_user(9)  # user 8 has no event
    assert sums["events"].sum() == out["events"] and sums["events"][8] == 0
    for key in metrics.METRIC_KEYS:
        assert sums[key].shape == (9,)
        assert sums[key].sum() / sums["events"].sum() == pytest.approx(out[key])


def test_per_user_needs_the_users():
    acc = metrics.MetricsAccumulator()
    acc.add_ranks(np.array([1.0]), np.array([3]), np.array([False]), np.array([False]))
    with pytest.raises(ValueError, match="user"):
        acc.per_user(1)


def test_paired_bootstrap_difference_interval_and_p_value():
    events = np.full(60, 10)
    theirs = np.random.default_rng(0).integers(0, 6, size=60).astype(float)
    # the same model: no difference, an interval of width 0, p = 1
    same = metrics.paired_bootstrap(theirs, theirs, events)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    # better by one hit in ten events for every user: +0.1, sure
    better = metrics.paired_bootstrap(theirs + 1, theirs, events)
    assert better["difference"] == pytest.approx(0.1)
    assert better["ci95"] == pytest.approx([0.1, 0.1]) and better["p_value"] == 0.0
    assert better["users"] == 60 and better["rounds"] == 2000
    # a few users, all better: every resample is, yet a sign-flip test of U users cannot go
    # below 2 / 2^U (one user was "p < 0.001: significant"); from 11 users on that is
    # under the 2,000 resamples' resolution and the bootstrap's p stands
    for users, floor in ((1, 1.0), (2, 0.5), (5, 0.0625), (11, 2.0 ** -10)):
        few = metrics.paired_bootstrap(theirs[:users] + 1, theirs[:users], events[:users])
        assert few["ci95"] == pytest.approx([0.1, 0.1]) and few["p_value"] == floor, few
    assert metrics.paired_bootstrap(theirs[:12] + 1, theirs[:12], events[:12])["p_value"] == 0
    # users without a scored event add nothing: left out, not resampled as zero differences
    # (20 of them beside 5 users, all better, made p = 0.004 "over 25 users"; audit)
    pad = np.zeros(20)
    mixed = metrics.paired_bootstrap(np.concatenate([theirs[:5] + 1, pad]),
                                     np.concatenate([theirs[:5], pad]),
                                     np.concatenate([events[:5], pad.astype(int)]))
    assert mixed["users"] == 5 and mixed["p_value"] == 0.0625, mixed
    assert metrics.p_floor(60) == 2.0 ** -59
    # the same total gain from one user's habit: a third of the resamples leave that user
    # out, so the interval reaches 0 and the difference is not significant
    one = theirs.copy()
    one[7] += 60
    habit = metrics.paired_bootstrap(one, theirs, events)
    assert habit["difference"] == pytest.approx(0.1)
    assert habit["ci95"][0] == 0.0 and habit["ci95"][1] > 0.1 and habit["p_value"] > 0.5
    # a 95% interval: for many users of independent gains, about the normal one's width,
    # 2 x 1.96 standard errors (a 90% interval is 16% narrower), centred on the difference
    rng = np.random.default_rng(0)
    base = rng.integers(0, 6, size=400).astype(float)
    gains = base + rng.normal(0.5, 2.0, size=400)
    wide = metrics.paired_bootstrap(gains, base, np.full(400, 10))
    se = np.std(gains - base) / np.sqrt(400) / 10
    assert 0.93 < (wide["ci95"][1] - wide["ci95"][0]) / (2 * 1.96 * se) < 1.07
    assert sum(wide["ci95"]) / 2 == pytest.approx(wide["difference"], abs=0.1 * se)
    # a function of the inputs and the seed
    assert metrics.paired_bootstrap(one, theirs, events, seed=5) == \
        metrics.paired_bootstrap(one, theirs, events, seed=5)
    with pytest.raises(ValueError, match="shape"):
        metrics.paired_bootstrap(one[:5], theirs, events)
    with pytest.raises(ValueError, match="no events"):
        metrics.paired_bootstrap(one, theirs, np.zeros(60))
