"""Writing into a directory without losing anything: the one helper every writer uses (checkpoints,
adapters, merge, training state).

Each file is written to a temporary name beside its final name and renamed over it, so a crash leaves
either the old file or the new one, never half of one, and a file of the directory that is not being
written is left alone (as transformers' and peft's save_pretrained do). `stale` names files of an earlier
save of the same kind that would contradict the new one (a sharded checkpoint's index beside a new single
file): they are removed after the new files are in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, VLStackError


def write_files(directory: str | Path, files: dict[str, Callable[[Path], None]], stale: Iterable[str] = ()) -> Path:
    """files: {name: write(path)}. Every file is written to a temporary path first; only when all are
    written are they renamed into place, in the order given (put the file that marks a save complete last)."""
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"cannot write into {target}: it is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot create the directory {target}: {e.strerror}") from None
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
            os.close(fd)
            written.append((Path(tmp), target / name))
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~umask())  # (mkstemp makes it 0600: as any other file the user writes instead)
        for tmp, final in written:
            os.replace(tmp, final)
    except BaseException as e:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a read-only directory...: name the place, no traceback
            raise ConfigError(f"writing into {target} failed: {e.strerror or e}") from None
        raise
    for name in stale:
        if name not in files:
            (target / name).unlink(missing_ok=True)
    return target


def overlap(a: Path, b: Path) -> bool:
    """Whether two paths are the same or one lies inside the other (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


@contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """A directory written whole: yields a temporary directory beside out (with the umask's permissions), renamed
    to out (which may exist empty) when the block ends, removed if it raises: no half-written out, ever."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # (mkdtemp makes it 0700)
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"writing {out} failed: {e.strerror or e}") from None
        raise


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: a race with other threads' files)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o22)
        os.umask(mask)
        return mask


def sha256_file(path: str | Path) -> str:
    """The file's sha256, hex (read a MiB at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def json_value(text: str, where: str, error: type[VLStackError]) -> object:
    """A JSON text (a dataset's line, a request body...) -> its value, or `error` naming where and why: not JSON,
    nested too deeply, a number too long to read, text that is not Unicode (a lone surrogate, from an escape)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    except ValueError as e:  # (a JSON error, or an integer of over 4,300 digits)
        why = "a number too long to read" if "digits" in str(e) else f"not valid JSON ({getattr(e, 'msg', e)})"
        raise error(f"{where}: {why}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: holds text that is not valid Unicode (a lone surrogate)") from None
    return value


def read_yaml(path: str | Path, what: str, error: type[VLStackError] = ConfigError) -> Any:
    """The contents of an operator's YAML (or JSON) file, or `error` naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except (yaml.YAMLError, RecursionError) as e:
        why = " ".join(str(e).split()) or "nested too deeply"  # (on one line)
        raise error(f"{path}: not valid YAML or JSON: {why}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
