"""model.compare's pure parts: seed aggregation, relative gain, the Markdown table."""
import json

import pytest

from model import compare


def _metrics(r20, m20, first=0.1):
    keys = {k: 0.0 for k in compare.METRIC_KEYS}
    keys.update({"recall@20": r20, "mrr@20": m20, "events": 100, "unknown_targets": 2})
    out = dict(keys, model="x", split="test", data="/d")
    for g in compare.GROUPS:
        out[g] = dict(keys, **({"recall@20": first} if g == "first_item" else {}))
    return out


def test_aggregate_means_and_population_std_over_seeds():
    agg = compare.aggregate([_metrics(0.2, 0.1), _metrics(0.4, 0.3)])
    assert agg["recall@20"] == pytest.approx(0.3)
    assert agg["std"]["recall@20"] == pytest.approx(0.1)
    assert agg["first_item"]["recall@20"] == pytest.approx(0.1)
    assert agg["std"]["first_item"]["recall@20"] == pytest.approx(0.0)
    assert agg["events"] == 100 and agg["seeds"] == 2 and agg["model"] == "x"


def test_relative_gain_and_table_mark_the_best_value():
    results = {"models": {"hiertcn": compare.aggregate([_metrics(0.33, 0.1)]),
                          "sknn": compare.aggregate([_metrics(0.30, 0.12)])}}
    for m in results["models"].values():
        m.update(train_seconds=1.0, events_per_s=10.0, parameters=5)
    gain = compare.relative_gain(results)
    assert gain["recall@20"]["relative_gain"] == pytest.approx(0.1)
    assert gain["mrr@20"]["best_baseline"] == "sknn"
    assert gain["mrr@20"]["relative_gain"] == pytest.approx(-1 / 6)
    md = compare.markdown_table(results)
    hier = next(line for line in md.splitlines() if line.startswith("| hiertcn"))
    sknn = next(line for line in md.splitlines() if line.startswith("| sknn"))
    assert "**0.3300**" in hier and "**0.1200**" in sknn and "0.1000 |" in hier
    assert "+10.0%" in md
    json.dumps(results)


def test_model_names_are_validated():
    assert compare.parse_model_names("hiertcn, sknn,hiertcn:solo") == ["hiertcn", "sknn", "hiertcn:solo"]
    with pytest.raises(compare.CompareError, match="unknown model 'bert4rec'"):
        compare.parse_model_names("hiertcn,bert4rec")
    with pytest.raises(compare.CompareError, match="twice"):
        compare.parse_model_names("sknn,sknn")
