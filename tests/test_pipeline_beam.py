"""The composite transform on a handful of hand-written events (Beam TestPipeline)."""
import json

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from tensorflow.core.example import example_pb2

from pipeline import parse, schema, sources
from pipeline.transforms import Config, SessionRecords

# Two files; in sorted order b.csv comes after a.csv, so the tie at t=100 for user u1
# puts a.csv's item "x" before b.csv's "y", and x@105 is then no immediate repeat.
A = """user,item,time
u1,x,100
u1,x,105
u2,y,0
u2,x,60
u2,x,61
u2,y,5000
u2,x,5100
bad row
u1,y,99999
u1,x,99999
"""
B = """user,item,time
u1,y,100
u2,y,-3
u3,x,7000
u3,y,7001
"""


def _decode(record):
    ex = example_pb2.SequenceExample()
    ex.ParseFromString(record)
    fl = ex.feature_lists.feature_list
    return (ex.context.feature[schema.USER_ID].bytes_list.value[0].decode(),
            ex.context.feature[schema.NUM_CONTEXT_SESSIONS].int64_list.value[0],
            tuple(tuple(f.int64_list.value) for f in fl[schema.ITEMS].feature),
            tuple(tuple(f.int64_list.value) for f in fl[schema.TIMES].feature))


def test_session_records_on_hand_written_events(tmp_path):
    (tmp_path / "a.csv").write_text(A)
    (tmp_path / "b.csv").write_text(B)
    files = sources.match_inputs([str(tmp_path / "*.csv")])
    fmt = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time"))
    config = Config(formats={0: fmt, 1: fmt}, min_item_count=2, valid_fraction=0.25,
                    test_fraction=0.25)
    # Sessions (gap 1800 s, after collapsing): u1 [x@100, y@100, x@105], u1 [y, x]@99999
    # (tie: line order); u2 [y@0, x@60] (x@61 collapsed), u2 [y@5000, x@5100]; u3 [x, y]@7000.
    # Starts 0, 100, 5000, 7000, 99999: p50 lower = 5000, p75 lower = 7000.
    # Train = u2's first and u1's first session: x 3, y 2 → x=2, y=3.
    # Rows: 14 read = 2 malformed + 1 repeat + 11 written (train 5, valid 2, test 4).
    with BeamTestPipeline(runner="FnApiRunner") as p:
        ranges = p | beam.Create(sources.plan_ranges(files))
        out = ranges | SessionRecords(config)
        assert_that(out["train"] | "dt" >> beam.Map(_decode), equal_to([
            ("u1", 0, ((2, 3, 2),), ((100, 100, 105),)),
            ("u2", 0, ((3, 2),), ((0, 60),))]), label="train")
        assert_that(out["valid"] | "dv" >> beam.Map(_decode), equal_to([
            ("u2", 1, ((3, 2), (3, 2)), ((0, 60), (5000, 5100)))]), label="valid")
        assert_that(out["test"] | "ds" >> beam.Map(_decode), equal_to([
            ("u1", 1, ((2, 3, 2), (3, 2)), ((100, 100, 105), (99999, 99999))),
            ("u3", 0, ((2, 3),), ((7000, 7001),))]), label="test")
        assert_that(out["cutoffs"], equal_to([{"t_valid": 5000, "t_test": 7000}]), label="cut")
        assert_that(out["vocabulary"], equal_to([[("x", 3), ("y", 2)]]), label="vocab")
        assert_that(out["stats"], equal_to([{
            "rows_read": 14, "rows_malformed": 2, "rows_filtered/immediate_repeat": 1,
            "rows_written": 11, "splits/train/users": 2, "splits/train/sessions": 2,
            "splits/train/events": 5, "splits/valid/users": 1, "splits/valid/sessions": 1,
            "splits/valid/events": 2, "splits/test/users": 2, "splits/test/sessions": 2,
            "splits/test/events": 4,
            # u1, u2, u3 written (each once, whatever its splits), of three sessionized
            "users_written": 3, "users_sessionized": 3,
            # the most events of one user per split: u1's 3 in train, u2's 2 in valid,
            # 2 each in test
            "max_user_events/train": 3, "max_user_events/valid": 2,
            "max_user_events/test": 2,
            # the longest session per split: u1's 3 in train, 2 in valid and test
            "max_session_events/train": 3, "max_session_events/valid": 2,
            "max_session_events/test": 2,
            # whose: u1, u2, and of test's tie the greater id, u3
            "heaviest_user/train": (3, "u1"), "heaviest_user/valid": (2, "u2"),
            "heaviest_user/test": (2, "u3"),
            # 6 consecutive pairs in the five sessions; x@100 y@100 and y x@99999 at one time
            "session_event_pairs": 6, "same_time_pairs": 2,
            # of which x y in the ids' order, y x the other way (as text and by length)
            "same_time_pairs_in_id_order.ascending": 1,
            "same_time_pairs_in_id_order.descending": 1,
            "same_time_pairs_in_id_order.ascending_by_length": 1,
            "same_time_pairs_in_id_order.descending_by_length": 1,
            # the other 4 in the input's order but b.csv's y@100 → a.csv's x@105
            "time_ordered_pairs_by_input_order.forward": 3,
            "time_ordered_pairs_by_input_order.backward": 1,
            # per split: train u1 [x y x], u2 [y x]; valid u2 [y x]; test u1 [y x], u3 [x y],
            # a tie in train and one in test, runs of 2 events at one time
            "session_event_pairs/train": 3, "session_event_pairs/valid": 1,
            "session_event_pairs/test": 2, "same_time_pairs/train": 1,
            "same_time_pairs/test": 1, "max_same_time_run/train": 2,
            "max_same_time_run/test": 2}]), label="stats")
        # the malformed rows by kind of reason (`parse.RowError.kind`), the commonest first
        assert_that(out["malformed_kinds"], equal_to([{
            "negative time …": 1, "wrong column count: expected 3, got 1": 1}]), label="kinds")
        assert_that(out["malformed"] | beam.Map(json.loads), equal_to([
            {"source": files[0][0], "line": 9, "reason": "wrong column count: expected 3, got 1",
             "raw": "bad row"},
            {"source": files[1][0], "line": 3, "reason": "negative time '-3'", "raw": "u2,y,-3"}]),
            label="malformed")


def test_a_worker_that_opens_its_control_stream_after_the_run_ended_is_told_to_exit():
    """`beam_fixes`: the local runner closes a worker's control connection at the end of a
    run; a worker that opens it only then (it started late, the run failed early) used to
    wait for instructions forever, and the runner for it to exit (a failed run that hung
    under load). Beam's own servicer, as the worker's stream reaches it: the stream ends."""
    import threading

    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    from pipeline import beam_fixes

    assert beam_fixes.apply() and beam_fixes.apply()  # idempotent
    servicer = worker_handlers.BeamFnControlServicer(worker_manager=None)
    servicer.get_conn_by_worker_id("late").close()  # the run ends before the worker connects

    class StreamContext:  # what the servicer reads of gRPC's context: the worker's id
        @staticmethod
        def invocation_metadata():
            return [("worker_id", "late")]

    sent = []
    stream = threading.Thread(target=lambda: sent.extend(servicer.Control(iter(()), StreamContext())),
                              daemon=True)
    stream.start()
    stream.join(10)
    assert not stream.is_alive() and sent == []  # no instruction, the stream over: it exits
