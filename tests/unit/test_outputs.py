"""Output files: refused before any work when they cannot be written, written whole."""

from __future__ import annotations

import errno
import os

import pytest

from lavender_checks import outputs
from lavender_checks.outputs import OutputFileError, check_output_file, write_file


def test_a_writable_path_passes_and_its_folder_is_made(tmp_path):
    check_output_file("--out", tmp_path / "new" / "deeper" / "x.txt")
    assert (tmp_path / "new" / "deeper").is_dir()


def test_a_folder_a_path_under_a_file_and_a_refused_probe_are_named(tmp_path, monkeypatch):
    with pytest.raises(OutputFileError, match=r"^--out .*: is a folder; give the path of a file$"):
        check_output_file("--out", tmp_path)
    (tmp_path / "plain").write_text("", encoding="utf-8")
    with pytest.raises(OutputFileError, match=r"/plain is a file, not a folder$"):
        check_output_file("--out", tmp_path / "plain" / "a" / "x.txt")

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputFileError, match=r"x\.txt: cannot write there \(Read-only file system\)$"):
        check_output_file("--out", tmp_path / "x.txt")


def test_the_file_is_written_whole(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old\n", encoding="utf-8")
    assert write_file("--out", target, lambda fh: fh.write("new\n")) == target
    assert target.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old\n", encoding="utf-8")

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "replace", no_space)
    with pytest.raises(OutputFileError, match=r"^--out .*x\.txt: cannot write it \(No space left on device\)$"):
        write_file("--out", target, lambda fh: fh.write("new\n"))
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
