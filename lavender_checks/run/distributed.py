"""The gate under torchrun: many GPUs, many hosts.

``torchrun --nnodes H --nproc-per-node G -m pytest tests/benchmarks ...`` (or ``-m
lavender_checks.cli run ...``) starts one process per GPU; each is a *rank*. Every rank

* uses the GPU of its ``LOCAL_RANK`` (``CUDA_VISIBLE_DEVICES`` set before CUDA starts,
  ``pin_local_gpu``), loads the pair once and generates shard ``RANK`` of ``WORLD_SIZE`` of
  every benchmark: the whole-image blocks of ``data.subset(shard=)``, the same shards as
  ``pytest -n N`` (``TorchrunShards`` is handed to the pipeline where the file barrier of
  ``-n N`` goes);
* meets the others through a gloo process group (``Group``): a barrier that also carries
  each rank's error, broadcasts and gathers; no files, no polling;
* rank 0 then scores the union, gates and writes the report; the other ranks are done once
  their shard is stored (the pytest plugin skips their cases, naming rank 0).

The prediction store (``--store-sharing``):

* ``shared``: every rank sees the same ``--store`` folder (one filesystem on every host):
  each rank appends its own file there and rank 0 reads the union after the barrier;
* ``gather``: each host has its own ``--store``: before generating, rank 0 sends every rank
  the stored rows of its shard and collects the rows any rank holds that rank 0 lacks (rows
  of an earlier, interrupted launch); after generating, every rank's new rows are gathered
  to rank 0 (``gather_object``) and appended to its store. A rank's own store keeps what it
  generated, so a crash loses nothing stored;
* ``auto`` (default): rank 0 writes a probe file into its store folder and every rank looks
  for it: ``shared`` when all of them see it, else ``gather``.

Faults: a rank that raises reports its error at the next barrier and every rank stops with
it. A rank that dies (killed, out of memory) closes its connections: the others stop at their
next meeting with an error naming it and its host (``RankFailure``; arrivals are recorded in
torchrun's key-value store, so the ranks that never arrived are the ones named). A rank that
hangs alive is caught by the group's timeout (``--dist-timeout``). Ranks finish their own
shard before they meet, so what they generated is stored; a relaunch with any world size
resumes from the store.

This module knows nothing of benchmarks or scoring: the pipeline hands it the work.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lavender_checks.run.store import PredictionStore

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STORE_SHARING = ("auto", "shared", "gather")
# Ranks wait for the slowest shard at the barrier: the limit must exceed the longest
# difference between two ranks' shards (a dead rank is noticed at once; this bounds a hang).
DEFAULT_TIMEOUT_S = 1800.0
_DIAGNOSIS_TIMEOUT_S = 10.0  # looking up who arrived, once a meeting has failed
# Shared store: how long rank 0 waits for other hosts' rows to show (NFS attribute caches
# keep a folder's listing for up to 60 s by default).
SHARED_GRACE_S = 90.0

# Options of `lavender-checks run` and of pytest (argparse keywords), used under torchrun only.
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--store-sharing", dict(choices=STORE_SHARING, default="auto",
                             help="under torchrun: shared (every host sees the same --store folder), "
                                  "gather (each host its own --store; rows are gathered to rank 0 "
                                  "through torch.distributed) or auto (detect; the default)")),
    ("--dist-timeout", dict(type=float, metavar="SECONDS", default=DEFAULT_TIMEOUT_S,
                            help="under torchrun: how long a rank waits for the others at a "
                                 f"barrier before it stops (default {DEFAULT_TIMEOUT_S:g}); it must "
                                 "exceed the time between the first and the last rank finishing "
                                 "its shard")),
)


class RankFailure(RuntimeError):
    """Another rank failed, died or hung: the message names it, its host and what it reported."""


class DistributedUsageError(ValueError):
    """Options that cannot work under torchrun; the message says which and why."""


def check_options(store_sharing: str, timeout_s: float, environ: Mapping[str, str] | None = None) -> None:
    """The torchrun options, before any work: a timeout that is a positive number of seconds,
    and ``--store-sharing`` other than auto only where torchrun started this process."""
    if not float(timeout_s) > 0 or not math.isfinite(float(timeout_s)):
        raise DistributedUsageError(f"--dist-timeout must be a positive number of seconds, got {timeout_s:g}")
    if store_sharing != "auto" and not launched(environ):
        raise DistributedUsageError(f"--store-sharing {store_sharing} decides how torchrun's ranks share "
                                    "the store: this process was not started by torchrun; drop it")


# ----------------------------------------------------------------------------- this process


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    environ = os.environ if environ is None else environ
    return all(environ.get(name) for name in TORCHRUN_ENV)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int  # torchrun's GROUP_RANK: which host of the launch
    host: str
    pid: int
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES entry this rank uses

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankInfo:
        environ = os.environ if environ is None else environ
        missing = [name for name in TORCHRUN_ENV if not environ.get(name)]
        if missing:
            raise DistributedUsageError(f"not started by torchrun: {', '.join(missing)} not set")
        return cls(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                   local_rank=int(environ["LOCAL_RANK"]), node_rank=int(environ.get("GROUP_RANK", -1)),
                   host=socket.gethostname(), pid=os.getpid(),
                   gpu=environ.get("CUDA_VISIBLE_DEVICES") or None)

    def name(self) -> str:
        """'rank 3 of 4 (node 1, local rank 1, host gpu-07, pid 4242)'."""
        node = f"node {self.node_rank}, " if self.node_rank >= 0 else ""
        return (f"rank {self.rank} of {self.world_size} ({node}local rank {self.local_rank}, "
                f"host {self.host}, pid {self.pid})")

    @property
    def writer(self) -> str:
        """This rank's file name in the prediction store."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"rank{self.rank}-{self.host}")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, found without initialising CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i in range(len(list(proc.iterdir())))]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    lines = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(lines))] if listing.returncode == 0 else []


def pin_local_gpu(gpu_ids: Sequence[str], environ: dict | None = None) -> str | None:
    """Make the GPU of this rank's LOCAL_RANK the only one it sees (before CUDA starts);
    returns it (None without GPUs). More ranks than GPUs on a host share them round-robin."""
    environ = os.environ if environ is None else environ
    if not gpu_ids or "LOCAL_RANK" not in environ:
        return None
    local_rank = int(environ["LOCAL_RANK"])
    gpu = gpu_ids[local_rank % len(gpu_ids)]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # Too late for the variable: CUDA already enumerated every visible GPU.
        if environ.get("CUDA_VISIBLE_DEVICES") != gpu:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return gpu
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def check_device(device: str | None) -> None:
    """Under torchrun each rank sees one GPU (its LOCAL_RANK's): an index names another. When
    CUDA started in this process before the rank could hide the other GPUs (``pin_local_gpu``
    then makes the rank's GPU the current device), every index, cuda:0 included, names a GPU
    of the host, the same for every rank: refused too."""
    if not device or not re.fullmatch(r"cuda:\d+", device):
        return
    if device != "cuda:0":
        raise DistributedUsageError(
            f"--device {device}: under torchrun each rank uses the GPU of its LOCAL_RANK, which it "
            "sees as cuda:0; give --device cuda (or leave it out)")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.device_count() > 1:
        raise DistributedUsageError(
            f"--device {device}: under torchrun each rank uses the GPU of its LOCAL_RANK, but CUDA "
            f"started in this process before the rank could hide the host's other GPUs, so {device} "
            "is the host's first GPU for every rank; give --device cuda (the rank's own GPU) or "
            "leave it out")


# ----------------------------------------------------------------------------- the group


class Group:
    """The gloo process group of a launch, and torchrun's key-value store for diagnosis.

    Every meeting (``agree``, ``broadcast``, ``gather``, ``all_gather``) is numbered; a rank
    records its arrival at meeting k in the key-value store before it joins, so when a
    meeting fails (a peer's connection closed, or the timeout passed) the ranks that never
    arrived can be named.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, environ: Mapping[str, str] | None = None):
        import torch.distributed as dist

        environ = os.environ if environ is None else environ
        self.me = RankInfo.from_env(environ)
        self.timeout_s = float(timeout_s)
        if not self.timeout_s > 0:
            raise DistributedUsageError(f"--dist-timeout must be positive, got {timeout_s}")
        timeout = _dt.timedelta(seconds=self.timeout_s)
        # Under torchrun the agent hosts the store (it outlives any one worker); another
        # launcher that only sets the variables gets one hosted by rank 0.
        agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        base = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), self.me.world_size,
                             is_master=not agent_store and self.me.rank == 0, timeout=timeout,
                             wait_for_workers=False)
        attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._kv = dist.PrefixStore(f"lavender-checks/{environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}/", base)
        self._dist = dist
        self._step = 0
        self.ranks: list[RankInfo] = [self.me]  # every rank's, once they have met
        self._kv.set(f"joined/{self.me.rank}", self.me.name())
        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", store=dist.PrefixStore("gloo/", self._kv),
                                        rank=self.me.rank, world_size=self.me.world_size, timeout=timeout)
            except Exception as exc:  # a rank that never started (a crash on import, a lost host)
                raise RankFailure(self._diagnose("join", "joined", exc)) from exc
        self._pg = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        met = self.all_gather((self.me, uuid.uuid4().hex), "start")
        self.ranks = [info for info, _ in met]
        self.launch_id = met[0][1]  # the same on every rank: names the run's store locks

    @property
    def rank(self) -> int:
        return self.me.rank

    @property
    def world_size(self) -> int:
        return self.me.world_size

    # --- meetings

    def _meeting(self, phase: str, call: Callable[[], Any]) -> Any:
        self._step += 1
        key = f"arrived/{self._step}"
        try:
            self._kv.set(f"{key}/{self.rank}", phase)
        except Exception:  # noqa: BLE001 - an unreachable store shows in the meeting itself
            pass
        try:
            return call()
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError
            raise RankFailure(self._diagnose(phase, key, exc)) from exc

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._meeting(phase, lambda: self._dist.all_gather_object(out, obj, group=self._pg))
        return out

    def broadcast(self, obj: Any, phase: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.rank == 0 else None]
        self._meeting(phase, lambda: self._dist.broadcast_object_list(box, src=0, group=self._pg))
        return box[0]

    def gather(self, obj: Any, phase: str) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world_size if self.rank == 0 else None
        self._meeting(phase, lambda: self._dist.gather_object(obj, out, dst=0, group=self._pg))
        return out

    def agree(self, phase: str, error: BaseException | None = None, payload: Any = None) -> list[Any]:
        """A barrier that carries each rank's outcome: raises RankFailure on every rank when
        any rank arrives with an error (a rank arriving with its own error returns, so that
        it can raise that error itself). Returns every rank's ``payload``, in rank order."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        outcomes = self.all_gather((mine, payload), phase)
        failed = [(self.ranks[r], text) for r, (text, _) in enumerate(outcomes) if text is not None]
        if failed and error is None:
            raise RankFailure(f"{self.me.name()}: stopping at '{phase}': " + "; ".join(
                f"{info.name()} failed: {text}" for info, text in failed)
                + ". The predictions stored so far are kept; a relaunch resumes from them.")
        return [payload for _, payload in outcomes]

    def _diagnose(self, phase: str, key: str, exc: BaseException) -> str:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            self._kv.set_timeout(_dt.timedelta(seconds=_DIAGNOSIS_TIMEOUT_S))
            absent = [self._name_of(rank) for rank in range(self.world_size)
                      if not self._kv.check([f"{key}/{rank}"])]
        except Exception as store_exc:  # noqa: BLE001
            absent = None
            cause += (f" (torchrun's store on {os.environ.get('MASTER_ADDR')}:"
                      f"{os.environ.get('MASTER_PORT')} is unreachable too: {store_exc}; the host "
                      "of node 0 is probably down)")
        if absent:
            who = "; ".join(absent)
            what = (f"{'it' if len(absent) == 1 else 'they'} never arrived: died, killed or hung "
                    "(see torchrun's output on that host)")
        elif absent == []:
            who, what = "a rank", "left after arriving"
        else:
            who, what = "another rank", "could not be reached"
        return (f"{self.me.name()}: the ranks stopped meeting at '{phase}': {who}: {what}. "
                f"gloo (--dist-timeout {self.timeout_s:g} s): {cause}. The predictions stored so "
                "far are kept; a relaunch (any world size) resumes from them.")

    def _name_of(self, rank: int) -> str:
        """A rank's name: from the group once it met, else from what it wrote when it joined."""
        if rank < len(self.ranks) and self.ranks[rank].rank == rank:
            return self.ranks[rank].name()
        if self._kv.check([f"joined/{rank}"]):
            return self._kv.get(f"joined/{rank}").decode()
        return f"rank {rank} of {self.world_size} (never started)"


_GROUP: Group | None = None


def group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """This process's group, made on first use (every rank must call it)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = Group(timeout_s)
    return _GROUP


# ----------------------------------------------------------------------------- ending a rank


# How long a rank that stops with an error, other than local rank 0, leaves the launcher to end
# it (torchrun checks its ranks every 0.1 s by default: --monitor-interval).
LAUNCHER_GRACE_S = 10.0


def leave_failure_to_launcher(line: str, *, environ: Mapping[str, str] | None = None,
                              grace_s: float = LAUNCHER_GRACE_S, sleep: Callable[[float], None] = time.sleep) -> None:
    """The last thing a torchrun rank does before it exits with an error status, having
    printed ``line``; outside torchrun, nothing.

    For a launch whose ranks failed, torchrun prints its own traceback and a summary with one
    entry for every rank that did not end with status 0. So that the summary is short and says
    what happened:

    * ``line`` goes to the error file torchrun gives each rank (``TORCHELASTIC_ERROR_FILE``),
      in the format of torch's own ``ErrorHandler``: the entry shows it where it would
      otherwise point to torch's documentation;
    * local rank 0 exits at once; the host's other ranks wait up to ``grace_s`` for the
      launcher, which ends them (SIGTERM) once it sees a rank fail. They answer it with status
      0, so that the summary names one rank per host, not every GPU's; the launch fails all the same, through local rank 0. All of
      them stop on the same error (every rank learns another's at their meetings), each has
      printed its line, and what they stored is kept. A rank nobody ends exits with its status.
    """
    environ = os.environ if environ is None else environ
    if not launched(environ):
        return
    waits = environ.get("LOCAL_RANK", "0") != "0"
    if waits:  # first: torchrun may end this rank as soon as local rank 0 has exited
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    error_file = environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                              "timestamp": str(int(time.time()))}}}
        try:
            Path(error_file).write_text(json.dumps(record), encoding="utf-8")
        except OSError:
            pass  # the summary then points to torch's documentation, as without it
    if waits:
        sleep(grace_s)


# ----------------------------------------------------------------------------- the store


Work = list[tuple[Any, list]]  # [(StoreKey, indices of this rank's shard)], the same keys on every rank
_RowKey = tuple[Any, str]  # (index, prompt sha)


def _plain(index: Any) -> Any:
    try:
        return int(index) if float(index) == int(index) and not isinstance(index, str) else str(index)
    except (TypeError, ValueError):
        return str(index)


def _stored(store: PredictionStore, key: Any, writer: str) -> dict[_RowKey, str]:
    """Every stored row of ``key``: (index, prompt sha) -> prediction, the newest one."""
    return {(r.index, r.prompt_sha): r.prediction for r in store.log(key, writer=writer).records()}


class TorchrunShards:
    """The generation of one run shared by the ranks of a torchrun launch (module docstring):
    rank r generates shard r of n; rank 0 alone scores (``scores``)."""

    def __init__(self, group: Group, store_root: str | Path, sharing: str = "auto"):
        if sharing not in STORE_SHARING:
            raise DistributedUsageError(f"unknown --store-sharing {sharing!r}; choices: {', '.join(STORE_SHARING)}")
        self.group = group
        self.store_root = Path(store_root)
        self.asked = sharing
        self.sharing: str | None = None
        self.count = group.world_size
        self.own = group.rank
        self.rows = {"generated_here": 0, "seeded": 0, "gathered": 0}
        self.generated_by_rank: list[int] | None = None

    @property
    def scores(self) -> bool:
        return self.own == 0

    @property
    def writer(self) -> str:
        return self.group.me.writer

    @property
    def run_id(self) -> str:
        """One name for the whole launch: its ranks share the store keys' locks."""
        return f"torchrun:{self.group.launch_id}"

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.count, "store_sharing": self.sharing, "asked": self.asked,
                "timeout_s": self.group.timeout_s, "rows": dict(self.rows),
                "generated_by_rank": self.generated_by_rank,
                "ranks": [asdict(info) for info in self.group.ranks]}

    def skip_reason(self) -> str:
        zero = self.group.ranks[0]
        return (f"{self.group.me.name()} generated shard {self.own} of {self.count}; "
                f"{zero.name()} scores the union, gates and writes the report: see its output")

    def check(self, check: Callable[[], None], phase: str = "inputs checked") -> None:
        """Run ``check`` (input checks) on every rank and stop every rank when any fails:
        a folder missing on one host stops the launch at once, naming that rank."""
        error = None
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised here
            error = exc
        self.group.agree(phase, error)
        if error is not None:
            raise error

    def take_locks(self, keys: Sequence[Any], store: PredictionStore) -> None:
        """The launch's locks on ``keys`` in ``store``, taken so that rank 0 holds them.

        A lock is released by the process that wrote it, and judged stale once that process
        is gone. Rank 0 uses the keys last (it scores after every shard is stored), so in a
        folder rank 0 shares the lock must be its own: a lock written by another rank would
        go with that rank while rank 0 still reads the keys. So: every rank clears the stale
        locks of its host (only a rank on that host can tell that their process is gone),
        then rank 0 takes the locks, then the others, who find rank 0's lock (one run) or,
        in a folder of their own (``gather``), take their own. Any refusal stops every rank.
        """
        def clear() -> None:
            for key in keys:
                store.clear_stale_lock(key)

        def take() -> None:
            for key in keys:
                store.lock(key)

        self.check(clear, "stale locks cleared")
        self.check(take if self.group.rank == 0 else lambda: None, "locks taken by rank 0")
        self.check(take, "locks taken")

    # --- sharing

    def decide_sharing(self) -> str:
        """``shared`` or ``gather`` (``auto``: shared when every rank sees rank 0's store)."""
        g = self.group
        token = None
        if g.rank == 0:
            self.store_root.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            (self.store_root / f".sharing-probe-{token}").write_text(token)
        token = g.broadcast(token, "store probe")
        probe = self.store_root / f".sharing-probe-{token}"
        try:
            sees = probe.read_text() == token
        except OSError:
            sees = False
        seen = g.all_gather((sees, str(self.store_root.resolve())), "store probe")
        if g.rank == 0:
            probe.unlink(missing_ok=True)
        blind = [(g.ranks[r], path) for r, (ok, path) in enumerate(seen) if not ok]
        if self.asked == "shared" and blind:
            raise DistributedUsageError(
                f"--store-sharing shared, but these ranks do not see rank 0's store folder "
                f"{seen[0][1]}: " + "; ".join(f"{info.name()} (its --store is {path})" for info, path in blind)
                + ". Mount one filesystem at that path on every host, or use --store-sharing gather.")
        self.sharing = self.asked if self.asked != "auto" else ("gather" if blind else "shared")
        return self.sharing

    # --- the run

    def share(self, generate: Callable[[int, int], None], work: Callable[[int, int], Work],
              store: PredictionStore) -> None:
        """Generate this rank's shard (the pair loads on its first generation), and have rank
        0's ``store`` hold every shard's rows afterwards. ``work(i, n)``: the store keys of the
        run with the indices of shard i of n. Called once a run, or once a round of
        ``--stop-early``: the counts (``rows``, ``generated_by_rank``) add up over the calls."""
        g = self.group
        self.decide_sharing()
        error: BaseException | None = None
        try:
            mine = work(self.own, self.count)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised here
            error = exc
        g.agree("start", error)
        if error is not None:
            raise error
        self.take_locks([key for key, _ in mine], store)  # (already held when the run took them first)
        known = self._seed(mine, store) if self.sharing == "gather" else None
        before = self._count(mine, store)
        try:
            generate(self.own, self.count)
        except BaseException as exc:
            g.agree("shard generated", exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            raise
        total = self._count(mine, store)
        self.rows["generated_here"] += total - before
        outcomes = g.agree("shard generated", payload=(total - before, total))
        earlier = self.generated_by_rank or [0] * len(outcomes)
        self.generated_by_rank = [before_here + generated for before_here, (generated, _) in zip(earlier, outcomes)]
        if known is not None:
            self._gather_new(mine, store, known)
        elif g.rank == 0:
            self._see_every_row(mine, store, {g.ranks[r].writer: stored for r, (_, stored) in enumerate(outcomes)})

    def _counts(self, work: Work, store: PredictionStore) -> Counter:
        """Rows each writer's file holds for the run's keys."""
        return Counter(r.writer for key, _ in work for r in store.log(key, writer=self.writer).records())

    def _count(self, work: Work, store: PredictionStore) -> int:
        """Rows this rank's own file holds for the run's keys."""
        return self._counts(work, store)[self.writer]

    def _see_every_row(self, work: Work, store: PredictionStore, stored: Mapping[str, int],
                       grace_s: float = SHARED_GRACE_S, step_s: float = 2.0) -> None:
        """Shared mode, rank 0: every row the ranks stored must be visible here. A network
        filesystem may show another host's new file or lines late (attribute caches), so
        this waits ``grace_s`` at most, then says what it cannot see."""
        deadline = time.monotonic() + grace_s
        while True:
            seen = self._counts(work, store)
            unseen = {writer: count - seen[writer] for writer, count in stored.items() if count > seen[writer]}
            if not unseen or time.monotonic() >= deadline:
                break
            time.sleep(step_s)
        if unseen:
            raise RankFailure(
                f"{self.group.me.name()}: the store {self.store_root} does not show rows that other "
                "ranks stored there (" + ", ".join(f"{n} of {w}.jsonl" for w, n in unseen.items())
                + f", {grace_s:g} s after they were written): it is not one filesystem on every host, "
                "or its caches are stale. Use --store-sharing gather; the rows are kept where they "
                "were written.")

    def _seed(self, work: Work, store: PredictionStore) -> list[dict[_RowKey, str]]:
        """Gather mode, before generating: rank 0 collects the rows any rank holds that it
        lacks (an earlier launch's), then every rank takes the rows of its shard that it
        lacks. Returns the rows rank 0 holds, per key."""
        g = self.group
        central = [_stored(store, key, self.writer) for key, _ in work] if g.rank == 0 else None
        central = g.broadcast(central, "store contents")
        lacking = [] if g.rank == 0 else [
            {row: prediction for row, prediction in _stored(store, key, self.writer).items()
             if row not in known} for (key, _), known in zip(work, central)]
        offered = g.gather(lacking, "rows rank 0 lacks")
        added: list[dict[_RowKey, str]] = [{} for _ in work]
        if g.rank == 0:
            for source, rows in enumerate(offered):
                self.rows["gathered"] += self._append_new(work, store, rows, central, source, added)
        added = g.broadcast(added, "rows rank 0 took")
        union = [{**known, **extra} for known, extra in zip(central, added)]
        if g.rank != 0:
            for (key, indices), rows in zip(work, union):
                wanted = {_plain(i) for i in indices}
                local = _stored(store, key, self.writer)
                missing = [(index, prediction, sha) for (index, sha), prediction in rows.items()
                           if index in wanted and local.get((index, sha)) != prediction]
                self.rows["seeded"] += store.log(key, writer=self.writer).append(missing)
        return union

    def _append_new(self, work: Work, store: PredictionStore, rows: list[dict[_RowKey, str]],
                    central: list[dict[_RowKey, str]], source: int,
                    added: list[dict[_RowKey, str]] | None = None) -> int:
        """Rank 0: append the rows ``source`` offers that its store lacks (``central``, kept
        up to date; ``added`` collects them)."""
        appended = 0
        writer = f"from-{self.group.ranks[source].writer}"
        for position, ((key, _), offered, known) in enumerate(zip(work, rows, central)):
            new = [(index, prediction, sha) for (index, sha), prediction in offered.items()
                   if (index, sha) not in known]
            if new:
                appended += store.log(key, writer=writer).append(new)
                fresh = {(index, sha): prediction for index, prediction, sha in new}
                known.update(fresh)
                if added is not None:
                    added[position].update(fresh)
        return appended

    def _gather_new(self, work: Work, store: PredictionStore, known: list[dict[_RowKey, str]]) -> None:
        """Gather mode, after generating: every rank's new rows to rank 0's store."""
        g = self.group
        # Only this rank's own file: ranks of one host may share a --store folder.
        new = [] if g.rank == 0 else [
            {(r.index, r.prompt_sha): r.prediction
             for r in store.log(key, writer=self.writer).records()
             if r.writer == self.writer and (r.index, r.prompt_sha) not in seen}
            for (key, _), seen in zip(work, known)]
        offered = g.gather(new, "new rows to rank 0")
        if g.rank == 0:
            central = [_stored(store, key, self.writer) for key, _ in work]
            for source, rows in enumerate(offered):
                if source != 0:
                    self.rows["gathered"] += self._append_new(work, store, rows, central, source)
