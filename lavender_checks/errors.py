"""One convention for how every ``lavender-checks`` command and the pytest gate end.

Exit status: 0 all good; 1 the gate failed (a number outside its band, or missing); 2 bad
input (an option, folder or file that cannot be used), reported before any expensive work as
one line ``lavender-checks <command>: error: <what and where>``; 3 under torchrun, another rank
failed, died or hung (the line names it and its host); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM: a scheduler's or torchrun's stop), both saying that stored predictions are
kept. Under pytest an input error stops the session with the same line and status 2.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_INPUT = 2
EXIT_RANK_FAILED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does (locks
    released, finished predictions stored) and ends with its own status."""


def error_line(command: str, error: BaseException | str) -> str:
    return f"lavender-checks {command}: error: {error}"
