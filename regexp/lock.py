"""One writer per run dir: `writing(dirs, key)` makes this process the only writer of each
dir for the length of the block. Readers (compare, diagnose, load, W&B) never lock.

The lock is a file, `<dir>/.regexp.lock`, holding who writes the dir: host, pid, the
process's start time (a reused pid is not the holder) and the SLURM job, if any. It is
made whole in a temp file and linked into place, which is atomic on a local disk and on
NFS, where `flock` may not hold between nodes. It is removed when the block ends, however
it ends (an exception, a signal). A holder killed outright (SIGKILL, a node lost) leaves its
file behind: the next writer finds that its process no longer runs (same host: the pid is
gone, a zombie, or another process now; another host: `squeue` no longer lists its SLURM
job), takes the lock over (race-free between takers: `_take_over`) and says whose it was. A
lock of another host whose end cannot be checked is never assumed stale: the message names
its holder and the file to remove.

Re-entrant within one process (the CLI locks a run dir in its pre-flight, then training
locks it again; the basic launcher runs a sweep's jobs one after another); a forked or
spawned worker is another process and takes its own locks. This module imports only the
standard library and regexp.rundir (a leaf).
"""

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from regexp.rundir import ConfigError, RunError, cannot_write

LOCK = ".regexp.lock"
SQUEUE_TIMEOUT_S = 10
TRIES = 20  # looks at a lock that other processes take and leave


class DirHeld(ConfigError):
    """Another live process writes the dir: the command (or the sweep's job) is refused and
    writes nothing there."""


@dataclass
class _Held:
    pid: int  # the process that took it (a forked child holds nothing of its parent's)
    thread: int  # and its thread: two threads of one process (regexp.run) are two writers
    record: bytes  # what the lock file says: ours only if it still says this
    depth: int = 1


_held: dict[str, _Held] = {}  # real path of the dir -> this process's lock on it (which thread holds it)
_registry = threading.Lock()


@contextmanager
def writing(dirs: Iterable[Path], key: str) -> Iterator[None]:
    """Hold each of `dirs` as its only writer (created when missing) until the block ends.
    DirHeld (a ConfigError naming `key` and the dir) when a live process holds one, or when
    two of `dirs` are one dir; RunError when a lock file is not one or cannot be written."""
    dirs = [Path(d) for d in dirs]
    seen: dict[str, Path] = {}
    for d in dirs:
        if seen.setdefault(os.path.realpath(d), d) is not d:
            raise DirHeld(key, str(d), "two runs of this command would write this dir; give each run its own dir")
    with ExitStack() as held:
        for d in dirs:
            held.enter_context(_holding(d, key))
        yield


@contextmanager
def _holding(run_dir: Path, key: str) -> Iterator[None]:
    name = os.path.realpath(run_dir)
    with _registry:
        mine = _held.get(name)
        if mine is not None and mine.pid == os.getpid():
            if mine.thread != threading.get_ident():
                raise DirHeld(key, str(run_dir), "another thread of this process writes this dir now; "
                                                 "wait for it to end or choose another dir")
            mine.depth += 1
        else:
            mine = _held[name] = _Held(os.getpid(), threading.get_ident(), _acquire(run_dir, key))
    try:
        yield
    finally:
        with _registry:
            mine.depth -= 1
            if mine.depth == 0:
                del _held[name]
                _release(Path(name) / LOCK, mine.record)  # the same file, wherever the process has moved since


def check_free(run_dir: Path, key: str, value: str) -> None:
    """The pre-flight of a dir this command locks later (its run or sweep dir, a sweep's job dir,
    under `key=value`): DirHeld when a live process holds it now, or holds a dir above it (a
    sweep whose job dir this is, though that job has not started yet). A stale lock is left for
    the writer to take over; what is not a lock above the dir is not this command's business."""
    run_dir = Path(os.path.abspath(run_dir))
    holder = read_holder(run_dir / LOCK)
    if holder is not None and holder.ended() is None:
        raise DirHeld(key, value, holder.refusal(run_dir / LOCK))
    for above in run_dir.parents:
        try:
            holder = read_holder(above / LOCK)
        except RunError:
            continue
        if holder is not None and holder.pid != os.getpid() and holder.ended() is None:
            raise DirHeld(key, value, f"{run_dir} lies inside {above}, which another regexp process writes now "
                                      f"({holder}); wait for it to end")


# ---------------------------------------------------------------- taking and leaving
def _acquire(run_dir: Path, key: str) -> bytes:
    """Create the lock file, or take over a stale one; the record written in it."""
    lock, record = run_dir / LOCK, _record()
    for _ in range(TRIES):  # a holder may leave, or another taker take a stale lock over, between our looks
        if _create(lock, record):
            return record
        holder = read_holder(lock)
        if holder is None:
            continue
        ended = holder.ended()
        if ended is None:
            raise DirHeld(key, str(run_dir), holder.refusal(lock))
        if _take_over(lock, holder.raw, record):
            print(f"regexp: {run_dir}: took over the lock of {holder} ({ended})", file=sys.stderr)
            return record
        time.sleep(0.05)  # another taker is at it: its lock is there in a moment
    raise DirHeld(key, str(run_dir), "other processes keep taking this dir's lock; wait for them to end or "
                                     "choose another")


def _record() -> bytes:
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": uuid.uuid4().hex}  # two records never read alike, whatever else they share
    return json.dumps(mine).encode()


def _create(path: Path, record: bytes) -> bool:
    """Put `record` at `path` unless something is there: whole in a temp file first, then a
    hard link, atomic on NFS too (where O_EXCL was not always). False when the path is taken."""
    tmp = _written(path, record)
    try:
        os.link(tmp, path, follow_symlinks=False)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if os.stat(tmp).st_nlink == 2:  # NFS may report a link it made as failed: the count tells
            return True
        raise cannot_write(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def _written(path: Path, record: bytes) -> Path:
    """A temp file beside `path` holding `record`, on disk."""
    tmp = path.with_name(f"{LOCK}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, e) from None
    return tmp


def _take_over(lock: Path, judged: bytes, record: bytes) -> bool:
    """Replace the stale lock that read `judged` by `record`, race-free: one taker at a time
    holds a claim on that stale lock (a file beside it, made as a lock is), checks that the
    lock still reads `judged`, and renames its own over it. Nothing else changes the path
    meanwhile: its holder is dead, a new writer's link fails on an existing file, and other
    takers have no claim. False when another taker holds the claim or has been faster."""
    claim = lock.with_name(f"{LOCK}.{hashlib.sha256(judged).hexdigest()[:16]}.claim")
    if not _create(claim, record):
        _remove_dead_claim(claim)  # a taker killed mid-way leaves its claim; a live one is at work
        return False
    try:
        if _read_bytes(lock) != judged:
            return False
        tmp = _written(lock, record)
        try:
            os.replace(tmp, lock)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise cannot_write(lock, e) from None
        return True
    except OSError:  # the lock is gone or unreadable since we judged it: look again
        return False
    finally:
        claim.unlink(missing_ok=True)


def _remove_dead_claim(claim: Path) -> None:
    """Remove the claim of a taker that no longer runs: renamed aside (only one remover moves
    it), then checked to be the one found dead; a live claim moved by mistake (made in
    between) is linked back at once."""
    holder = read_holder(claim)
    if holder is None or holder.ended() is None:
        return
    aside = claim.with_name(f"{claim.name}.{os.getpid()}.dead")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:  # another remover was faster
        return
    try:
        if _read_bytes(aside) != holder.raw:
            os.link(aside, claim, follow_symlinks=False)
    except FileExistsError:  # a third taker claimed in between: two claims. Not guarded: it takes a taker
        pass  # killed mid-way and three more racing within microseconds
    finally:
        aside.unlink(missing_ok=True)


def _release(lock: Path, record: bytes) -> None:
    """Remove our lock file, and only ours."""
    try:
        if _read_bytes(lock) == record:
            os.unlink(lock)
    except OSError:  # gone already, or a disk that fails: the next writer finds our process ended
        pass


# ---------------------------------------------------------------- who holds it
@dataclass
class Holder:
    """What a lock file says about the process that holds its dir."""

    raw: bytes
    host: str
    pid: int
    start: Optional[int] = None  # /proc/<pid>/stat field 22
    slurm_job: Optional[str] = None
    since: Optional[str] = None

    def __str__(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        since = f", since {self.since}" if self.since else ""
        return f"pid {self.pid} on host {self.host}{job}{since}"

    def ended(self) -> Optional[str]:
        """Why the holder no longer runs; None when it runs, or may (another host's, unknown)."""
        if self.host == socket.gethostname():
            now = _process_state(self.pid)
            if now is None:
                return "that process no longer runs"
            if now[0] == "Z":
                return "that process has ended (a zombie)"
            if self.start is not None and now[1] != self.start:
                return "that pid is another process now"
            return None
        if self.slurm_job and _slurm_job_ended(self.slurm_job):
            return f"squeue no longer lists SLURM job {self.slurm_job}"
        return None

    def refusal(self, lock: Path) -> str:
        """The allowed part of DirHeld's line: who writes the dir, and what to do."""
        ours = self.host == socket.gethostname() and self.pid == os.getpid()  # regexp.run in another thread
        writer = "a run in another thread of this process" if ours else "another regexp process"
        text = f"{writer} writes {lock.parent} now ({self})"
        if self.host != socket.gethostname():
            return f"{text}; wait for it to end, or if it no longer runs remove {lock}"
        return f"{text}; wait for it to end or choose another dir"


def read_holder(lock: Path) -> Optional[Holder]:
    """The holder a lock file names; None when there is no lock. RunError naming the file when
    something else is at its path (a directory, a FIFO, a link, garbage): a lock that is not
    ours is never removed."""
    try:
        raw = _read_bytes(lock)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _not_a_lock(lock, e.strerror or str(e)) from None
    try:
        data = json.loads(raw)
        holder = Holder(raw, data["host"], data["pid"], data.get("start"), data.get("slurm_job"), data.get("since"))
        if not (isinstance(holder.host, str) and _is_int(holder.pid) and holder.pid > 0
                and (holder.start is None or _is_int(holder.start))):
            raise ValueError("no host, pid and start time")
        return holder
    except (ValueError, KeyError, TypeError) as e:
        raise _not_a_lock(lock, f"not a lock record: {e}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_bytes(path: Path) -> bytes:
    """A regular file's bytes; never follows a link, never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _not_a_lock(lock: Path, why: str) -> RunError:
    return RunError(f"{lock}: not a regexp lock file ({why}); if no regexp process writes {lock.parent}, remove it")


def _process_state(pid: int) -> Optional[tuple[str, Optional[int]]]:
    """(state letter, start time in clock ticks since boot) of a running pid; None when there
    is no such process. Without /proc: ('?', None) for a pid that exists."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return None
    except PermissionError:  # another user's process: it exists
        pass
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return after_name[0], int(after_name[19])  # fields 3 (state) and 22 (starttime)
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ("?", None)
    except (OSError, IndexError, ValueError):
        return "?", None


def _start_time(pid: int) -> Optional[int]:
    state = _process_state(pid)
    return state[1] if state else None


def _slurm_job_ended(job: str) -> bool:
    """Whether SLURM says the job no longer runs; False when it cannot tell (no squeue here)."""
    if shutil.which("squeue") is None:
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                             timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return False
    if out.returncode == 0:
        return not out.stdout.strip()
    return "invalid job id" in out.stderr.lower()
