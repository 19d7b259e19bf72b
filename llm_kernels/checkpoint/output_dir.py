"""Safe output folders for the checkpoint writers (``quantize``, ``make-checkpoint``).

Every writer goes through :func:`staged_output_dir`:

1. :func:`check_output_dir` refuses, before anything is written, an output folder that is a
   source folder, lies inside one or contains one (symlinks resolved), a path that exists and
   is not a folder, and a non-empty folder unless ``force`` (``--force``). ``force`` never
   replaces the filesystem root, the home folder or a folder holding the working directory.
2. The checkpoint is written into a fresh hidden sibling ``.<name>.tmp-<pid>-<random>``.
3. Only when it is complete is the sibling renamed into place: over a missing or empty folder
   with one ``rename``; over an old checkpoint (``force``) by exchanging the two folders
   atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, the old folder
   put back if the second fails), then deleting the old one. A reader of the output path sees
   the old checkpoint or the new one, never a mixture of shards.
4. On any failure (including KeyboardInterrupt) the sibling is deleted and the output path is
   left as it was. Only a killed process (SIGKILL, power loss) leaves a hidden
   ``.<name>.tmp-*`` sibling behind, never a half checkpoint at the output path.

:func:`atomic_write_text` writes one file through a unique temporary name and a rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import OutputDirError

__all__ = ["OutputDirError", "check_output_dir", "staged_output_dir", "atomic_write_text", "unique_sibling"]


def unique_sibling(path: Path, tag: str = "tmp") -> Path:
    """``path.parent / ".<name>.<tag>-<pid>-<8 hex>"``: a hidden sibling name no other process
    (different pid) or call (random suffix) uses."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a unique temporary sibling and
    ``os.replace``: readers see the old file or the whole new one. The temporary file is
    removed on failure."""
    path = Path(path)
    tmp = unique_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | os.PathLike, sources: Iterable[str | os.PathLike] = (), force: bool = False,
                     flag: str = "--out") -> Path:
    """Validate an output folder before anything is written; return its resolved path.

    Args:
        out: the output folder (need not exist; symlinks are resolved).
        sources: folders the writer reads (``quantize``'s ``--checkpoint``).
        force: allow a non-empty ``out`` (its contents are replaced once the new checkpoint
            is complete).
        flag: the option name used in messages.

    Raises:
        OutputDirError: ``out`` is a source, inside a source or contains one (both paths
            named); ``out`` exists and is not a folder; ``out`` is a non-empty folder and not
            ``force``; ``force`` on the filesystem root, the home folder or a folder that
            holds the current working directory (with or without ``force``: the new
            checkpoint replaces the whole folder).
    """
    target = Path(out).expanduser().resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if target == s:
            raise OutputDirError(f"{flag} {out} is the source checkpoint {src} (both resolve to {s}); "
                                 "write the new checkpoint to another folder")
        if _within(target, s):
            raise OutputDirError(f"{flag} {out} ({target}) lies inside the source checkpoint {src} ({s}); "
                                 "write the new checkpoint outside it")
        if _within(s, target):
            raise OutputDirError(f"{flag} {out} ({target}) contains the source checkpoint {src} ({s}); "
                                 "writing there would replace the source")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{flag} {out} exists and is not a folder; expected a new or empty folder")
    if target == Path(target.anchor) or target == Path.home().resolve() or _within(Path.cwd().resolve(), target):
        raise OutputDirError(f"refusing to write {flag} {out} ({target}), even with --force: it is the filesystem "
                             "root, the home folder or holds the working directory (the checkpoint replaces the "
                             "whole folder); give a new folder such as <name>/")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputDirError(f"{flag} {out} is not empty; choose a new or empty folder, or pass --force "
                             "(force=True) to replace its contents once the new checkpoint is complete")
    return target


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where that call is unavailable or refused by the filesystem."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _commit(staged: Path, target: Path, force: bool, out: str | os.PathLike, flag: str) -> None:
    """Move the complete ``staged`` folder to ``target`` (see the module docstring)."""
    if target.is_dir() and any(target.iterdir()):  # it may have been filled while we wrote
        if not force:
            raise OutputDirError(f"{flag} {out} was filled by someone else while the checkpoint was written; "
                                 "nothing replaced (pass --force to replace it)")
        if _exchange(staged, target):
            shutil.rmtree(staged)  # now holds the old checkpoint
            return
        old = unique_sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(staged, target)  # POSIX: replaces a missing or empty folder atomically
    except OSError as e:
        raise OutputDirError(f"cannot move the new checkpoint into {flag} {out}: {e}") from e


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, sources: Iterable[str | os.PathLike] = (), force: bool = False,
                      flag: str = "--out") -> Iterator[Path]:
    """Context manager yielding a fresh, empty hidden sibling folder of ``out`` to write a
    checkpoint into; on a normal exit it becomes ``out`` (see the module docstring), on an
    exception it is deleted and ``out`` is untouched.

    Raises:
        OutputDirError: as :func:`check_output_dir` (before anything is created), or when
            ``out`` was filled by another writer meanwhile (without ``force``).
        OSError: the parent folder cannot be created or written.
    """
    sources = list(sources)
    target = check_output_dir(out, sources, force, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = unique_sibling(target)
    staged.mkdir()
    try:
        yield staged
        _commit(staged, target, force, out, flag)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
