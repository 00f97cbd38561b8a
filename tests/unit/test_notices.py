"""Warnings as a command shows them (lavender_checks/notices.py): one line each, never Python's
"file:line: Category" with the source line under it; the libraries' warnings known to be
harmless (known_warnings.toml) not at all; --quiet also silences the libraries' logged ones."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from lavender_checks import notices
from lavender_checks.notices import known_warnings, one_line_notices


def test_every_known_warning_says_where_it_comes_from_and_why_it_is_harmless():
    known = known_warnings()
    assert known
    for entry in known:
        assert entry.source and entry.message and entry.why
        assert ":" not in entry.message  # pytest's filterwarnings splits on ":"


@pytest.mark.parametrize("quiet", [False, True])
def test_a_warning_is_one_line_and_the_known_ones_are_silent(quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with one_line_notices("run", quiet=quiet):
            warnings.warn("the TSV /data/MME.tsv is not VLMEvalKit's:\n  scores are not comparable", UserWarning)
            warnings.warn("The `is_gradient_checkpointing` property is deprecated", FutureWarning)
            shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                     for w in caught]
    assert shown == ["lavender-checks run: warning: the TSV /data/MME.tsv is not VLMEvalKit's: "
                     "scores are not comparable\n"]  # the known one was not even recorded


def test_outside_the_block_python_formats_warnings_as_before():
    before = warnings.formatwarning
    with one_line_notices("run"):
        assert warnings.formatwarning is not before
    assert warnings.formatwarning is before


@pytest.mark.parametrize("quiet", [False, True])
def test_the_libraries_logged_warnings(quiet, capsys):
    pytest.importorskip("transformers")
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("transformers.generation.configuration_utils")
    level = logging.getLogger("transformers").level
    handler = transformers_logging._get_library_root_logger().handlers[0]
    stream = handler.setStream(io.StringIO())  # transformers' own handler, bound at its import
    try:
        with one_line_notices("run", quiet=quiet):
            logger.warning("The following generation flags are not valid and may be ignored: ['top_p'].")
            logger.warning("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer TokenizersBackend. "
                           "The clean_up_tokenization post-processing step is designed for WordPiece")
            logger.warning("something a user should read")
        err = handler.stream.getvalue()
        assert "generation flags" not in err and "BPE" not in err
        assert ("something a user should read" in err) is (not quiet)
        assert logging.getLogger("transformers").level == level  # put back
        logger.warning("The following generation flags are not valid and may be ignored: ['top_p'].")
        assert "generation flags" in handler.stream.getvalue()  # the filter went with the block
    finally:
        handler.setStream(stream)


def test_the_data_list_is_the_one_place(tmp_path):
    path = tmp_path / "known.toml"
    path.write_text('[[warning]]\nsource = "python"\ncategory = "DeprecationWarning"\n'
                    'message = "old thing"\nwhy = "x"\n')
    assert notices.python_filters(known_warnings(path)) == [(".*old thing", "DeprecationWarning")]
