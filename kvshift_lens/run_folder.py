"""The run folder: what is in it, who may write it, how it is read, and when it may be deleted.

A run folder (``kvshift train --out RUN``)::

    RUN/
      run.json          the resolved run spec (model config, task, training settings)
      metrics.jsonl     one JSON record per line: {"step", "kind": "train" | "eval" | "summary", ...}
      checkpoints/      step_XXXXXXXX/ (model + optimiser + RNG + data position), latest
      final/            the trained model, once training has finished
      result.json       throughput and wall time (sweeps and the CLI); error.json when a sweep
                        run failed
      report.html       ``kvshift report RUN`` (and report_figures/)
      .kvshift.lock     held by the one process writing the run

A sweep folder holds ``sweep.json``, ``summary.json``, ``summary.md`` and one run folder per run
(``<variant>[__<size>]__seed<k>``); a reproduction experiment adds ``repro.json``.

What the toolkit promises about these folders (README, "What kvshift will never do to your files"):

- **One writer.** Training, resuming and sweeping take an exclusive OS-level lock
  (:class:`FolderLock`, ``flock``) on the folder they write. A second writer fails at once with
  the holder's PID. The kernel releases the lock when its process ends, however it ends, so a
  killed run never leaves a stale lock behind. Readers (report, eval, summaries) take no lock.
- **Nothing it did not create is deleted.** ``--overwrite`` deletes only a folder that is
  recognisably a kvshift run (a readable ``run.json``) and holds nothing but the entries above;
  anything else in it (your notes, data, a report saved under another name) makes it refuse.
  It never deletes ``/``, your home folder, the current folder or one of its parents, a git work
  tree, or a symbolic link.
- **Nothing is lost to a failed start.** A new run (and the replacement of an old one) is built in
  a staging folder inside RUN; the old run's files are swapped out only once the new run has
  started (its first evaluation is written). Until then a failure leaves the old run exactly as
  it was, and a brand-new run leaves no ``run.json`` behind.
- **History is rewritten atomically.** ``metrics.jsonl`` is appended line by line; when a resume
  drops records written after the checkpoint it resumes from, the file is rewritten to a
  temporary name and renamed, so a crash at any moment leaves the old history or the new one.
  Readers skip a last line cut short by a crash.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvshift_lens._files import atomic_write_text

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
FINAL_DIR = "final"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
REPORT_FILE = "report.html"
REPORT_FIGURES_DIR = "report_figures"
LOCK_FILE = ".kvshift.lock"
SWEEP_FILE = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
REPRO_MARKER = "repro.json"
STAGING_PREFIX = ".staging-"
REPLACED_PREFIX = ".replaced-"
CHECKPOINT_PREFIX = "step_"

RUN_ENTRIES = frozenset({RUN_FILE, METRICS_FILE, CHECKPOINTS_DIR, FINAL_DIR, RESULT_FILE,
                         ERROR_FILE, REPORT_FILE, REPORT_FIGURES_DIR, LOCK_FILE})
"""Everything the toolkit writes at the top of a run folder (besides its own hidden temporary
files): a folder holding anything else is never deleted."""


class RunFolderError(ValueError):
    """A run or sweep folder cannot be used as asked: it exists (and neither resume nor overwrite
    was asked for), does not match, holds files the toolkit did not write, or is being written by
    another process (:class:`FolderInUse`)."""


class FolderInUse(RunFolderError):
    """Another process holds the folder's lock."""


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive advisory lock on a folder (``flock`` on ``FOLDER/.kvshift.lock``).

    The lock file holds the holder's PID and what it is doing, for the error message of the next
    process that tries. The kernel drops the lock when the holding process exits, so there is never
    a stale lock to clean up. POSIX only (the toolkit's platforms).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "training"):
        self.folder = Path(folder)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        import fcntl

        if self._fd is not None:
            return self
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(path)
            raise FolderInUse(
                f"{self.folder} is being written by another process ({holder}); wait for it to "
                "finish or stop it, or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {self.purpose}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "PID unknown"


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A line that is not a JSON object (the last line of a
    run killed mid-write) is skipped with a warning naming the file and line."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            logger.warning("%s:%d is not a JSON record (cut short by a crash?); skipped", path, n)
    return out


def append_metric(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as one line (one ``write`` call)."""
    line = json.dumps(dict(record), allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def rewrite_metrics(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records``, atomically."""
    atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in records))


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the records of steps ``<= step`` (a resume from the checkpoint at ``step`` drops what a
    killed run logged after it, and any closing summary), one per ``(step, kind)``; atomically.
    ``step=0`` with no checkpoint to resume from drops everything."""
    path = Path(path)
    if not path.exists():
        return
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for rec in read_metrics(path):
        s, kind = rec.get("step"), rec.get("kind")
        if not isinstance(s, int) or kind == "summary" or s > step:
            continue
        seen[(s, str(kind))] = rec  # a duplicated record keeps the later one
    rewrite_metrics(path, seen.values())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The step checkpoints of a run, oldest first (complete folders only: a checkpoint appears
    under its ``step_XXXXXXXX`` name only once fully written)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX):])


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``checkpoints/latest`` points to; the newest step folder when the pointer is
    missing or points to nothing; None when the run has no checkpoint."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        folder = pointer.parent / name
        if name and "/" not in name and folder.is_dir() and folder.name.startswith(
                CHECKPOINT_PREFIX):
            return folder
        logger.warning("%s points to %r, which is not a checkpoint; using the newest step folder",
                       pointer, name)
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def write_latest(run_dir: str | os.PathLike, folder: Path) -> None:
    atomic_write_text(Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE, folder.name + "\n")


def model_folder(run_dir: str | os.PathLike) -> Path | None:
    """The model a reader should load from a run: ``final/`` when training has finished, else
    the latest checkpoint, else None."""
    final = Path(run_dir) / FINAL_DIR
    if (final / "config.json").is_file():
        return final
    return latest_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------------
# Recognising and deleting
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a kvshift run: a ``run.json`` with model, task and train sections."""
    spec = _read_json(Path(path) / RUN_FILE)
    return isinstance(spec, dict) and all(isinstance(spec.get(k), dict)
                                          for k in ("model", "task", "train"))


def _ours_hidden(name: str) -> bool:
    """Hidden entries the toolkit itself makes: the lock, staging and replaced folders, and the
    temporary files of atomic writes."""
    return name == LOCK_FILE or _stale(name)


def foreign_entries(path: Path, allowed: Iterable[str] = RUN_ENTRIES) -> list[str]:
    """The entries of ``path`` the toolkit would not have written there."""
    allowed = set(allowed)
    return sorted(e.name for e in path.iterdir() if e.name not in allowed
                  and not _ours_hidden(e.name))


def _dangerous(path: Path) -> str | None:
    """Why ``path`` must never be deleted, or None."""
    if str(path).strip() in ("", "."):
        return "it is the current folder"
    if path.is_symlink():
        return "it is a symbolic link"
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved == Path.home().resolve():
        return "it is your home folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one of its parents"
    if (resolved / ".git").exists():
        return "it is a git work tree"
    return None


def check_deletable_run(path: str | os.PathLike) -> None:
    """Raise :class:`RunFolderError` unless ``path`` is a run folder the toolkit may delete (see
    the module docstring)."""
    path = Path(path)
    why = _dangerous(path)
    if why is not None:
        raise RunFolderError(f"refusing to delete {str(path)!r}: {why}")
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a folder")
    if not is_run_folder(path):
        raise RunFolderError(
            f"refusing to delete {path}: it is not a kvshift run folder (no readable {RUN_FILE} "
            "with model, task and train sections); choose another --out")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:6]) + (", ..." if len(foreign) > 6 else "")
        raise RunFolderError(
            f"refusing to replace {path}: it holds {shown}, which kvshift did not write; move "
            "them elsewhere or choose another --out")


def _stale(name: str) -> bool:
    """Names of what a killed writer leaves behind: staging and replaced folders, temporary
    files of atomic writes, half-written and replaced checkpoints."""
    return (name.startswith((STAGING_PREFIX, REPLACED_PREFIX))
            or (name.startswith(".") and name.endswith((".tmp", ".replaced"))))


def remove_stale_staging(path: Path) -> None:
    """Delete what a killed writer left inside the run folder ``path`` and its checkpoints (call
    with ``path``'s lock held, so no live process is using them)."""
    for folder in (path, path / CHECKPOINTS_DIR):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for e in folder.iterdir():
            if not _stale(e.name) or e.is_symlink():
                continue
            if e.is_dir():
                shutil.rmtree(e, ignore_errors=True)
            else:
                e.unlink(missing_ok=True)


def _is_empty_but_ours(path: Path) -> bool:
    return all(_ours_hidden(e.name) for e in path.iterdir())


# ---------------------------------------------------------------------------------------------
# Opening a run folder for writing
# ---------------------------------------------------------------------------------------------


class RunWriter:
    """The one writer of a run folder, from the first file to the last.

    ``mode`` is ``"new"`` (the folder must be missing or empty), ``"resume"`` (it must hold a run)
    or ``"overwrite"`` (a run, or nothing, is replaced). :meth:`open` takes the lock and checks the
    folder; a new or replacing run then writes into a staging folder (:attr:`path`) until
    :meth:`commit_start` swaps it in. :meth:`close` releases the lock, and, if the start was never
    committed, removes the staging folder (and the run folder itself when this writer created it).
    """

    def __init__(self, run_dir: str | os.PathLike, mode: str, purpose: str = "training"):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode={mode!r} is not one of ['new', 'resume', 'overwrite']")
        self.run_dir = Path(run_dir)
        self.mode = mode
        self._lock = FolderLock(self.run_dir, purpose)
        self._created = False
        self._staging: Path | None = None
        self.committed = mode == "resume"

    @property
    def path(self) -> Path:
        """Where the run's files go now: the staging folder until the start is committed."""
        return self._staging if self._staging is not None else self.run_dir

    def open(self) -> RunWriter:
        run_dir = self.run_dir
        if str(run_dir).strip() == "":
            raise RunFolderError("the run folder is an empty path; name a folder")
        if run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"run folder {run_dir} exists and is not a directory")
        if self.mode == "resume":
            if not (run_dir / RUN_FILE).is_file():
                raise RunFolderError(f"cannot resume: {run_dir / RUN_FILE} is missing")
        self._created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
            remove_stale_staging(run_dir)
            if self.mode != "resume":
                self._check_replaceable()
                self._staging = run_dir / f"{STAGING_PREFIX}{os.getpid()}"
                self._staging.mkdir()
        except BaseException:
            self.close()
            raise
        return self

    def _check_replaceable(self) -> None:
        if _is_empty_but_ours(self.run_dir):
            return
        if self.mode == "new":
            raise RunFolderError(
                f"run folder {self.run_dir} already exists; pass --resume to continue it or "
                "--overwrite to start again")
        check_deletable_run(self.run_dir)

    def commit_start(self) -> None:
        """Swap the staged run into the run folder: the old run's files (when replacing one) are
        moved aside and deleted, the new run's moved in. Entries are moved one by one inside the
        locked folder, so the lock is held throughout."""
        if self.committed or self._staging is None:
            self.committed = True
            return
        run_dir, staging = self.run_dir, self._staging
        old = [e for e in run_dir.iterdir() if not _ours_hidden(e.name)]
        if old:
            check_deletable_run(run_dir)  # nothing foreign appeared since open()
            trash = run_dir / f"{REPLACED_PREFIX}{os.getpid()}"
            trash.mkdir()
            for e in old:
                os.replace(e, trash / e.name)
        for e in sorted(staging.iterdir()):
            os.replace(e, run_dir / e.name)
        staging.rmdir()
        self._staging = None
        self.committed = True
        if old:
            shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        """Release the lock; if the start was never committed, remove what this writer made."""
        try:
            if not self.committed:
                if self._staging is not None:
                    shutil.rmtree(self._staging, ignore_errors=True)
                    self._staging = None
                if self._created and self.run_dir.is_dir():
                    (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
                    try:
                        self.run_dir.rmdir()
                    except OSError:
                        pass
        finally:
            self._lock.release()

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "CHECKPOINTS_DIR",
    "ERROR_FILE",
    "FINAL_DIR",
    "FolderInUse",
    "FolderLock",
    "LOCK_FILE",
    "METRICS_FILE",
    "RESULT_FILE",
    "RUN_ENTRIES",
    "RUN_FILE",
    "RunFolderError",
    "RunWriter",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "SWEEP_FILE",
    "append_metric",
    "check_deletable_run",
    "checkpoint_folders",
    "is_run_folder",
    "latest_checkpoint",
    "model_folder",
    "read_metrics",
    "rewrite_metrics",
    "truncate_metrics",
]
