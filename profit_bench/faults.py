"""What can go wrong around a sweep, and the guards: code edited while trials run (a fingerprint each trial
checks), two launches of one experiment in one second (an atomic folder claim), a full disk (one line and the
command that resumes), an interrupt (the command that resumes). No Ray."""
from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from profit_bench import UserError, safe_name


# ---------------------------------------------------------------------------------------------- code pinning
CODE_PACKAGES = ("profit_bench", "baselines", "analysis")


_PROCESS_CODE: dict = {}  # this process's code_fingerprint, taken once: what it imported, not later edits


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over the .py files of profit_bench/, baselines/ and analysis/ (relative path + bytes, sorted):
    the code a sweep's trials run. Ray workers import the working tree, so an edit during a sweep would otherwise
    change what later trials execute under the same recorded commit."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def git_dirty(root: Path | None = None) -> str:
    """"true" when git sees uncommitted changes in the code packages, "false" when not, "unknown" outside git."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PACKAGES], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "unknown" if out.returncode else str(bool(out.stdout.strip())).lower()


def check_code(expected: str | None) -> None:
    """A trial refuses to run code other than what its sweep pinned (the worker's fingerprint, taken the first
    time this process runs a trial, before the trial's own imports)."""
    if expected is None:
        return
    have = _PROCESS_CODE.setdefault("sha256", code_fingerprint())
    if have != expected:
        raise UserError(f"code changed since the sweep started: this worker's profit_bench/baselines/analysis hash "
                        f"{have[:12]} differs from the sweep's {expected[:12]} (files under "
                        f"{Path(__file__).resolve().parent.parent} edited during the sweep?); restore them and "
                        f"--resume, or start a new sweep")


def pin_code(sweep, previous) -> str:
    """The code fingerprint this driver's trials must run (tags `code_sha256`, `git_dirty` on the parent and every
    child). On --resume after an edit: one warning line and the parent tag `code_changed_on_resume`; trials from
    then on run (and record) the new code."""
    code = code_fingerprint()
    sweep.code = {"code_sha256": code, "git_dirty": git_dirty()}
    started = previous.data.tags.get("code_sha256") if previous is not None else None
    if started and started != code:
        print(f"warning: the code changed since this sweep started (code_sha256 {started[:12]} → {code[:12]}); "
              f"the trials run from now on use the new code and record its hash", file=sys.stderr, flush=True)
        sweep.code["code_changed_on_resume"] = "true"
    return code


# ---------------------------------------------------------------------------------------------- folders, disks, interrupts
def claim_sweep_dir(storage: Path, experiment: str, now: datetime | None = None) -> Path:
    """A new folder for one sweep, created atomically (os.mkdir fails when it exists): two launches of one
    experiment in the same second get `NAME_<time>` and `NAME_<time>-2`, never one shared Ray folder and Optuna
    db. The folder's name is the sweep's identity (parent tag `sweep_dir`, Optuna study prefix)."""
    storage.mkdir(parents=True, exist_ok=True)
    base = f"{safe_name(experiment, 'experiment')}_{(now or datetime.now()).strftime('%Y-%m-%d_%H-%M-%S')}"
    for i in range(1, 1000):
        path = storage / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{storage}: 999 sweeps of {experiment!r} started in one second; wait a second")


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError 'no space left' (or quota exceeded) behind `exc`, following causes, contexts and Ray's
    wrapped task errors; None when the failure is something else."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and getattr(e, "errno", None) in DISK_FULL_ERRNOS:
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def disk_full_line(err: OSError, fallback: str) -> str:
    """'disk full writing PATH (N MB free on that file system)'."""
    import shutil
    path = Path(err.filename or fallback).resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1024 ** 2:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return f"disk full writing {path} ({free} on that file system; {err.strerror or err})"


def resume_args(argv, name) -> list[str]:
    args = list(argv if argv is not None else sys.argv[1:]) or [name]
    if "--resume" not in args:
        args.append("--resume")
    return args


def interrupted(argv, name) -> int:
    print(f"interrupted; continue with: python -m profit_bench.sweep {shlex.join(resume_args(argv, name))}",
          file=sys.stderr, flush=True)
    return 130


SIGTERM_GRACE_S = 15  # Slurm and Kubernetes send SIGKILL 30 s after SIGTERM


def install_sigterm(abort):
    """SIGTERM (timeout, Slurm, Kubernetes) gets Ctrl-C's clean stop: Tune catches SIGINT during fit. When the
    signal went to the whole process group, Ray's own processes die with it and Tune cannot stop cleanly; then
    `abort()` closes the MLflow record and prints the resume line after SIGTERM_GRACE_S, and the driver exits."""
    def watchdog():
        time.sleep(SIGTERM_GRACE_S)
        abort()
        os._exit(130)

    def handler(signum, frame):
        threading.Thread(target=watchdog, daemon=True).start()
        os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGTERM, handler)
