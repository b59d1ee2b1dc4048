"""model.atomic: results are written whole or not at all."""

import json
import os

import numpy as np
import pytest

from model import atomic


def test_write_json_round_trip_creates_the_folder(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic.write_json(str(path), {"b": 1, "a": [1.5, "x"]}, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": [1.5, "x"], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert os.listdir(path.parent) == ["result.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    atomic.write_json(str(path), {"run": 1})

    def half_then_fail(f):
        f.write('{"run": ')
        raise KeyboardInterrupt  # a BaseException, like a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomically(str(path), half_then_fail)
    with pytest.raises(TypeError):
        atomic.write_json(str(path), {"not json": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"run": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_binary_and_text_writes(tmp_path):
    npz = tmp_path / "per_user.npz"
    atomic.write_atomically(str(npz), lambda f: np.savez(f, x=np.arange(3)), binary=True)
    assert np.load(npz)["x"].tolist() == [0, 1, 2]
    tsv = tmp_path / "items.tsv"
    atomic.write_text(str(tsv), "index\titem_id\r\n0\t<pad>\n")
    assert tsv.read_bytes() == b"index\titem_id\r\n0\t<pad>\n"  # line endings kept as given


def test_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(str(tmp_path / "a.json"), {})
        with open(tmp_path / "b.json", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == \
        (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
