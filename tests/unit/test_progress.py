"""Generation progress (lavender_checks/run/progress.py): a bar on a terminal, one line per
benchmark and variant in a CI log."""

from __future__ import annotations

import io

from lavender_checks.run import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_log_is_no_tty_or_ci_set(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert progress.in_ci(io.StringIO()) and not progress.in_ci(_Tty())
    monkeypatch.setenv("CI", "true")
    assert progress.in_ci(_Tty())


def test_one_line_per_benchmark_and_variant_when_done():
    lines = []
    bars = progress.line_bars(lines.append)
    assert bars("MME base", 0, 56) is None  # nothing to generate: nothing to show
    bar = bars("MME lavender", 40, 56)
    bar.update(30)
    bar.update(10)
    assert lines == []
    bar.close()
    assert len(lines) == 1
    assert lines[0].startswith("MME lavender: generated 40 of 40 rows in ")
    assert lines[0].endswith(" s (16 of 56 were stored)")


def test_the_cli_writes_lines_in_a_ci_log(monkeypatch, capsys):
    monkeypatch.setenv("CI", "1")
    bar = progress.resolve(True)("DocVQA_VAL base", 2, 2)
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err.startswith("DocVQA_VAL base: generated 2 of 2 rows in ")
    assert progress.resolve(False) is None
