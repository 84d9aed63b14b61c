"""Output files: checked before any work, written atomically, alone or several as a unit.

Every writer of the package (checkpoints, pictures, ONNX files with their
external data, reports, the CLI and the demo) goes through this module, so
they follow the same rules:

- **Check first.** :func:`check_output` / :func:`check_outputs` refuse, before
  any expensive work, an output that is a directory, that exists (unless
  ``force``), or whose directory is missing, not a directory or not writable
  (tried by creating and removing a file there, so it is also right for root
  and read-only mounts). Messages name the real path, never a temporary one.
- **Directories are not created.** An output's directory must exist:
  "directory X does not exist: create it first". (A command whose output *is*
  a folder, such as the demo's ``--out``, creates that one folder itself,
  never its parents.)
- **Atomic.** Content goes to a temporary file in the destination's
  directory (inside a private ``.<name>.*.tmp`` folder, under the final file
  name, so writers that pick a format or a sibling file by name still do),
  is flushed to disk, then renamed onto the final name: a crash never leaves
  a half-written file under that name.
- **No overwrite without force.** Without ``force`` the final step is a hard
  link, which fails if the name appeared meanwhile.
- **Several files as a unit.** :func:`atomic_outputs` writes a group of files
  (an ONNX model and its external data); :func:`written_together` holds back
  every atomic write made inside its block and commits them all when the
  block ends without an error. If anything fails, the temporaries are
  removed, files already renamed are taken back (an overwritten file gets its
  old content back) and no output is left behind.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xvol_compiler.errors import XvolError

__all__ = [
    "OutputError",
    "OutputExistsError",
    "atomic_outputs",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output",
    "check_output_dir",
    "check_outputs",
    "written_now",
    "written_together",
]

PathLike = str | os.PathLike[str]


class OutputError(XvolError, ValueError):
    """An output that cannot be written as asked; the message (one line) names the path and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class OutputExistsError(OutputError, FileExistsError):
    """The output file exists and ``force`` was not given."""


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} exists: pass --force (force=True) to overwrite it")


def _check_directory(directory: Path, what: str) -> None:
    """``directory`` exists, is a directory and a file can be created in it; else OutputError naming ``what``."""
    if not directory.exists():
        ancestor = directory.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputError(f"cannot write {what}: {ancestor} is a file, not a directory")
        raise OutputError(f"cannot write {what}: directory {directory} does not exist: create it first")
    if not directory.is_dir():
        raise OutputError(f"cannot write {what}: {directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".xvol-probe.", dir=directory)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"cannot write {what}: directory {directory} is not writable ({reason})") from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_output(path: PathLike, *, force: bool = False) -> Path:
    """Refuse early (before any expensive work) an output that could not be written; return it as a Path.

    Raises :class:`OutputExistsError` for an existing file without ``force``
    and :class:`OutputError` for a directory given as the file, or a missing,
    non-directory or unwritable parent directory.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory: give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise _exists(path)
    _check_directory(path.parent, str(path))
    return path


def check_outputs(paths: Iterable[PathLike], *, force: bool = False) -> list[Path]:
    """:func:`check_output` for every path, and no path given twice."""
    out: list[Path] = []
    seen: dict[str, Path] = {}
    for p in paths:
        path = check_output(p, force=force)
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            raise OutputError(f"{path} is given for two outputs: give each output its own file")
        seen[key] = path
        out.append(path)
    return out


def check_output_dir(path: PathLike) -> Path:
    """A folder that outputs go into: an existing writable directory, or one to create whose parent
    exists and is writable (its parents are never created)."""
    path = Path(path)
    if path.is_dir():
        _check_directory(path, f"into {path}")
    elif path.exists():
        raise OutputError(f"{path} is not a directory: give a folder for the outputs")
    else:
        _check_directory(path.parent, f"folder {path}")
    return path


# ---------------------------------------------------------------------------
# Writing as a unit
# ---------------------------------------------------------------------------


@dataclass
class _Pending:
    final: Path
    tmp: Path
    force: bool
    optional: bool


class _OutputGroup:
    """Temporaries reserved next to their final paths, renamed onto them all at once by ``commit``."""

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self._folders: dict[Path, Path] = {}

    def reserve(self, path: PathLike, *, force: bool, optional: bool = False) -> Path:
        final = check_output(path, force=force)
        key = Path(os.path.abspath(final))
        if any(Path(os.path.abspath(p.final)) == key for p in self.pending):
            raise OutputError(f"{final} is written twice in one group of outputs")
        folder = self._folders.get(key.parent)
        if folder is None:
            try:
                folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            except OSError as err:
                raise OutputError(f"cannot write {final}: {err.strerror or err}") from err
            self._folders[key.parent] = folder
        tmp = folder / final.name
        self.pending.append(_Pending(final, tmp, force, optional))
        return tmp

    def drop(self, tmps: Sequence[Path]) -> None:
        """Forget reservations (their writer failed); their temporaries go."""
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending = [p for p in self.pending if p.tmp not in tmps]

    def discard(self) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        self.pending.clear()

    def commit(self) -> None:
        """Rename every temporary onto its final path; on any failure undo the renames done so far."""
        done: list[tuple[Path, Path | None]] = []  # (final, backup of the file it replaced)
        try:
            for p in self.pending:
                if not p.tmp.exists():
                    if p.optional:
                        continue
                    raise OutputError(f"nothing was written for {p.final}")
                _finish(p.tmp)
                done.append((p.final, _place(p)))
        except BaseException:
            for final, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        final.unlink()
            raise
        finally:
            self.discard()


def _finish(tmp: Path) -> None:
    """Flush to disk; give the permissions a plain open() would (umask applied)."""
    with contextlib.suppress(OSError), open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)


def _place(p: _Pending) -> Path | None:
    """Rename ``p.tmp`` onto ``p.final``; return a backup of the replaced file (forced overwrite), if any."""
    if not p.force:
        try:
            os.link(p.tmp, p.final)
        except FileExistsError:
            raise _exists(p.final) from None
        except OSError:  # a file system without hard links
            if p.final.exists():
                raise _exists(p.final) from None
            os.replace(p.tmp, p.final)
        return None
    backup = None
    if p.final.exists() or p.final.is_symlink():
        backup = p.tmp.with_name(p.tmp.name + ".replaced")
        try:
            os.link(p.final, backup, follow_symlinks=False)
        except OSError:
            backup = None  # cannot keep the old file for an undo; the overwrite itself stays atomic
    os.replace(p.tmp, p.final)
    return backup


_GROUP: contextvars.ContextVar[_OutputGroup | None] = contextvars.ContextVar("xvol_output_group", default=None)


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Commit every atomic write made inside the block together, when it ends without an error.

    Writes through this module (and so ``save_checkpoint``, ``save_model``,
    ``save_onnx``, ``export_onnx``, ``fuse_onnx(output_path=...)``,
    ``draw_graphs``) are held back as temporaries; if the block raises, none
    of them appears. Nested blocks join the outermost one.
    """
    if _GROUP.get() is not None:
        yield
        return
    group = _OutputGroup()
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        group.discard()
        raise
    finally:
        _GROUP.reset(token)
    group.commit()


@contextlib.contextmanager
def written_now() -> Iterator[None]:
    """Writes inside this block are committed when each ends, even inside :func:`written_together`:
    for scratch files that are read back at once (a model saved for onnxruntime to load)."""
    token = _GROUP.set(None)
    try:
        yield
    finally:
        _GROUP.reset(token)


@contextlib.contextmanager
def atomic_outputs(
    paths: Sequence[PathLike], *, force: bool = False, optional: Iterable[PathLike] = (),
) -> Iterator[list[Path]]:
    """Yield a temporary path for each of ``paths``; when the block succeeds they become ``paths``, as a unit.

    Each temporary has its final file name, in a private folder inside the
    final directory (files that refer to each other by name, such as an ONNX
    model and its external data, stay consistent). Paths in ``optional`` may be
    left unwritten (then nothing appears under that name). Inside
    :func:`written_together` the renames wait for the end of that block.
    On an exception nothing is renamed and the temporaries are removed.
    """
    optional_keys = {os.path.abspath(p) for p in optional}
    outer = _GROUP.get()
    group = outer if outer is not None else _OutputGroup()
    tmps: list[Path] = []
    try:
        for p in check_outputs(paths, force=force):
            tmps.append(group.reserve(p, force=force, optional=os.path.abspath(p) in optional_keys))
        yield list(tmps)
    except BaseException:
        if outer is None:
            group.discard()
        else:
            group.drop(tmps)
        raise
    if outer is None:
        group.commit()


@contextlib.contextmanager
def atomic_path(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path for ``path`` (same file name); on success it becomes ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    with atomic_outputs([path], force=force) as (tmp,):
        yield tmp


def atomic_write_bytes(path: PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, force: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def atomic_write_json(path: PathLike, data: Any, *, force: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically (non-JSON values via ``str``); return the path."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", force=force)
