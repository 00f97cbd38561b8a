"""Regression gate for Llama-3.2-11B-Vision-Instruct with and without the Lavender LoRA
adapter, scored as VLMEvalKit scores DocVQA_VAL, ChartQA_TEST, MMBench_DEV_EN and MME.
With no options, `lavender-checks run` gates the built-in tiny pair on the mini benchmarks."""

# Each subcommand lives in its own module, imported lazily so that `score` never pays for
# importing torch.

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from lavender_checks.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and main(args) -> int.
SUBCOMMANDS = {
    "run": ("lavender_checks.run.pipeline", "generate (or reuse) predictions for base and Lavender, score, gate and write a report"),
    "export": ("lavender_checks.run.export", "write a run's stored predictions as VLMEvalKit's prediction files (xlsx)"),
    "score": ("lavender_checks.rescore", "score a VLMEvalKit prediction file exactly as VLMEvalKit does"),
    "bench": ("lavender_checks.speed.bench", "speed benchmark on the full-size architecture with random weights (CUDA)"),
    "bench-gpus": ("lavender_checks.speed.gpus", "how the fast path scales over several GPUs, one process per GPU (CUDA)"),
    "bench-series": ("lavender_checks.speed.series", "a checkpoint series in one process against separate runs (CUDA)"),
    "make-mini-data": ("lavender_checks.synthetic.minidata", "rebuild the synthetic mini benchmarks in fixtures/lmudata-mini"),
    "make-vlmeval-folder": ("lavender_checks.synthetic.fullsize_data",
                            "write a VLMEvalKit work dir of full-size synthetic predictions that hit a reference's numbers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavender-checks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        # Arguments are declared by the module itself; importing it here is cheap because
        # modules keep heavy imports (torch, transformers) inside their functions.
        importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        with _sigterm_as_interrupt():
            return int(module.main(args) or 0)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}; finished predictions are kept and a rerun resumes from them", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


class _sigterm_as_interrupt:
    """SIGTERM unwinds the command as Ctrl-C does (``Terminated``); the previous handler is
    restored after it. Signal handlers belong to the main thread: elsewhere nothing changes."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_terminated)

    def __exit__(self, *exc_info):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
