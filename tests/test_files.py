"""Files and folders are replaced only once fully written."""

from __future__ import annotations

import pytest

from dynconvert.files import folder_replaced_on_success, replaced_on_success, write_json


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


def test_a_completed_folder_replaces_the_old_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with folder_replaced_on_success(out) as staging:
        assert staging.parent == tmp_path and not list(staging.iterdir())
        (staging / "report.json").write_text("new")
    assert [p.name for p in out.iterdir()] == ["report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_completed_folder_replaces_a_file_of_its_name(tmp_path):
    (tmp_path / "out").write_text("a file")
    with folder_replaced_on_success(tmp_path / "out") as staging:
        (staging / "meta.json").write_text("{}")
    assert (tmp_path / "out" / "meta.json").read_text() == "{}"


def test_a_failed_folder_keeps_the_old_one_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), folder_replaced_on_success(out) as staging:
        (staging / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_folder_gets_its_parents(tmp_path):
    with folder_replaced_on_success(tmp_path / "a" / "b") as staging:
        (staging / "x").write_text("1")
    assert (tmp_path / "a" / "b" / "x").read_text() == "1"


def test_a_killed_write_is_cleaned_up_by_the_next_one(tmp_path):
    """A process killed while staging leaves ``.out.partial``; one killed between moving the old
    folder aside and moving the new one in leaves only ``.out.previous``: the old output."""
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "half.json").write_text("half")
    (tmp_path / ".out.previous").mkdir()
    (tmp_path / ".out.previous" / "report.json").write_text("old")
    with pytest.raises(RuntimeError), folder_replaced_on_success(tmp_path / "out"):
        raise RuntimeError("this run fails too")
    assert (tmp_path / "out" / "report.json").read_text() == "old"  # the old output is back
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_stale_copy_of_the_old_folder_is_deleted(tmp_path):
    """Killed after the new folder took its name, before the old one was deleted."""
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.previous").mkdir()
    with folder_replaced_on_success(tmp_path / "out") as staging:
        (staging / "report.json").write_text("new")
    assert (tmp_path / "out" / "report.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
