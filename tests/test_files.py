"""Files are replaced only once fully written."""

from __future__ import annotations

import pytest

from dynconvert.files import replaced_on_success, write_json


def test_a_completed_write_replaces_the_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_json(path, {"accuracy": 0.5})
    assert path.read_text() == '{\n  "accuracy": 0.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("old")
    with pytest.raises(RuntimeError), replaced_on_success(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_the_temporary_file_keeps_the_suffix(tmp_path):
    """Writers that pick the format from the suffix (matplotlib) see the real one."""
    with replaced_on_success(tmp_path / "report.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "report.png").read_bytes() == b"png"


def test_the_folder_is_created(tmp_path):
    write_json(tmp_path / "new" / "deeper" / "check.json", {})
    assert (tmp_path / "new" / "deeper" / "check.json").read_text() == "{}\n"
