"""`OwnedFolder`: a folder daskrecon writes into — claimed before the first write, checked shared, removed only when all ours.

The folder half of a :class:`~daskrecon.engine.checkpoint.Checkpoint` (which adds the slots and
the commit record), and of every scratch folder: the rules of :mod:`daskrecon.runtime.storage`
applied to one location, a local path or an fsspec URL.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

from daskrecon.errors import NotOwnedError, StorageUnreachableError
from daskrecon.runtime import storage

__all__ = ["OwnedFolder"]


@dataclass
class SharedWith:
    """The worker set a folder (and every folder under it) was last found shared with, and what each check took."""

    workers: frozenset | None = None
    seconds: list = field(default_factory=list)


class OwnedFolder:
    """A folder daskrecon writes into.

    Parameters
    ----------
    url : str or Path
        A local directory or an fsspec URL (``s3://bucket/run``...; the protocol's package must
        be installed).
    storage_options : dict, optional
        Passed to fsspec for URLs (credentials, endpoint).
    reserved : tuple of str
        Names of files the owner writes whole in the folder (a checkpoint's commit record): a
        claimed folder that holds them without being daskrecon's is refused.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None, *, reserved: tuple = (),
                 shared: SharedWith | None = None) -> None:
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(url)
        self.storage_options = storage_options
        self.fs, root = url_to_fs(self.url, **(storage_options or {}))
        self.root = str(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.reserved = tuple(reserved)
        self.shared = shared if shared is not None else SharedWith()
        self._claimed = False

    @classmethod
    def temporary(cls, ctx: Any, scratch: str | os.PathLike | None = None, *, prefix: str = "daskrecon-",
                  why: str = "", storage_options: dict | None = None, reserved: tuple = ()) -> OwnedFolder:
        """A new, empty folder of daskrecon's under ``scratch`` (default :func:`~daskrecon.runtime.storage.default_scratch`),
        checked to be shared with the workers of ``ctx`` (removed again when it is not)."""
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        base = str(scratch) if scratch is not None else storage.default_scratch()
        fs, root = url_to_fs(base, **(storage_options or {}))
        where = f"{base.rstrip('/')}/{prefix}{uuid.uuid4().hex[:12]}"
        if isinstance(fs, LocalFileSystem):
            os.makedirs(root, exist_ok=True)
            where = tempfile.mkdtemp(prefix=prefix, dir=root)
        folder = cls(where, storage_options, reserved=reserved)
        folder.claim()
        try:
            folder.ensure_shared(ctx, why=why, default=scratch is None)
        except Exception:
            folder.remove()
            raise
        return folder

    def child(self, name: str) -> OwnedFolder:
        """The folder ``name`` inside this one (same storage; shared when this one is)."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"a child folder's name is one path component of letters, digits, '_', '.', '-', "
                             f"got {name!r}")
        return OwnedFolder(f"{self.url.rstrip('/')}/{name}", self.storage_options, reserved=self.reserved,
                           shared=self.shared)

    def path_of(self, name: str) -> str:
        """The path of ``name`` in the folder, on :attr:`fs`."""
        return posixpath.join(self.root, name)

    def owned(self) -> bool:
        """Whether the folder is daskrecon's (it holds :data:`daskrecon.runtime.storage.OWNER_FILE`)."""
        return self.fs.isfile(self.path_of(storage.OWNER_FILE))

    def owns_array(self, path: str) -> bool:
        """Whether the Zarr array at ``path`` (a path of :attr:`fs`) is daskrecon's."""
        try:
            meta = json.loads(self.fs.cat_file(posixpath.join(path, "zarr.json")))
        except (FileNotFoundError, ValueError, OSError):
            return False
        return storage.OWNER_ATTR in (meta.get("attributes") or {})

    def claim(self, overwrite: bool = False) -> None:
        """Make the folder daskrecon's before writing: create it, or accept it when empty or already its own.

        A folder that exists, is not empty and is not daskrecon's is refused, naming what is
        there; with ``overwrite=True`` daskrecon writes its own arrays next to those files and
        changes none of them (a name it needs that is taken is still refused).

        Raises
        ------
        NotOwnedError
        """
        if self._claimed:
            return
        try:
            exists = self.fs.exists(self.root)
        except Exception as exc:  # s3fs without credentials, an unknown host: the storage library's words, placed
            raise StorageUnreachableError(
                f"cannot reach {self.url!r} (the folder daskrecon would write to): {type(exc).__name__}: {exc}. "
                "The driver and every worker need the protocol's package and its credentials (environment "
                "variables, config files), or checkpoint=daskrecon.engine.checkpoint.Checkpoint(url, storage_options={...})"
            ) from exc
        if exists:
            if not self.fs.isdir(self.root):
                raise NotOwnedError(f"checkpoint {self.url!r} is a file, not a folder: choose another path")
            if not self.owned():
                names = sorted(posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(self.root, detail=False))
                if names and not overwrite:
                    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                    raise NotOwnedError(
                        f"checkpoint folder {self.url!r} exists and holds files that are not a daskrecon checkpoint "
                        f"({shown}); daskrecon does not write into someone else's folder: choose a new or empty "
                        "folder, or pass overwrite=True to write daskrecon's arrays next to those files (none of "
                        "them is changed)")
                taken = [n for n in names if n in self.reserved or n.startswith(".daskrecon")]
                if taken:
                    raise NotOwnedError(f"checkpoint folder {self.url!r} holds {', '.join(taken)}, which daskrecon "
                                        "would write but did not create: choose another folder")
        self.fs.makedirs(self.root, exist_ok=True)
        if not self.owned():
            self.fs.pipe_file(self.path_of(storage.OWNER_FILE),
                              json.dumps({"created_by": "daskrecon", "kind": "checkpoint"}).encode())
        self._claimed = True

    def ensure_shared(self, ctx: Any, *, why: str = "", default: bool = False) -> None:
        """Check, once per set of workers, that every worker of ``ctx`` sees this folder (see
        :func:`daskrecon.runtime.storage.check_shared`); claims it first.

        ``default``: the folder is the default scratch location, which the message says.

        Raises
        ------
        StorageNotSharedError
        """
        workers = frozenset(ctx.workers())
        if self.shared.workers is not None and workers <= self.shared.workers:
            return
        self.claim()
        hint = storage.HINT
        if default:
            hint = (f"this is the default scratch location (a folder in the driver's temporary directory "
                    f"{storage.default_scratch()!r}); {storage.HINT}")
        self.shared.seconds.append(storage.check_shared(ctx, self.fs, self.root, self.url, why=why, hint=hint))
        self.shared.workers = workers

    def remove(self) -> None:
        """Delete the whole folder, if it is daskrecon's and holds only what daskrecon made (else nothing)."""
        if not self.owned():
            return
        for p in self.fs.ls(self.root, detail=False):
            name = posixpath.basename(str(p).rstrip("/"))
            if name in self.reserved or name.startswith(".daskrecon"):
                continue
            if not (self.owns_array(str(p)) or self.fs.isfile(posixpath.join(str(p), storage.OWNER_FILE))):
                return  # something that is not ours: keep the folder
        self.fs.rm(self.root, recursive=True)
