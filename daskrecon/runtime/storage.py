"""Storage that daskrecon's tasks read and write: seen by every worker, owned by daskrecon.

Many nodes are the normal case (jobqueue nodes, cloud VMs): a worker may share no disk with
the driver. A path that the driver made on its own disk (a temporary folder, a checkpoint
folder on a laptop) then names a different, empty place on each worker; each writes its
chunks there and the others read nothing. Three rules keep that from ever returning a
wrong result:

* **Checked before the first write** — :func:`check_shared`: the driver writes a probe file
  holding a fresh random token; every worker must read the same token back (one call per
  worker, bounded in time) or :class:`~daskrecon.errors.StorageNotSharedError` names the
  location, the workers that cannot see it, and what to pass instead.
* **Owned** — a folder daskrecon writes into carries :data:`OWNER_FILE`, every array it
  creates the attribute :data:`OWNER_ATTR`. It writes, replaces and deletes only those
  (:class:`~daskrecon.errors.NotOwnedError` otherwise): a folder of someone else's files is
  refused, never "cleaned".
* **Never read as zeros** — every chunk of an owned array is written (also one that equals
  the fill value), and reading one that is missing raises
  :class:`~daskrecon.errors.MissingChunkError` (:mod:`daskrecon.tasks.regions`). The user's own
  Zarr inputs keep Zarr's meaning of a missing chunk, but an input a worker cannot open at all is
  refused: every worker present opens it before any work (:func:`check_sources_seen`), and one
  that joins later at its first read (:func:`strict_sources`).

The default scratch location (:func:`default_scratch`) is a new folder under the driver's
temporary directory (``tempfile.gettempdir()``: ``$TMPDIR``, else ``/tmp``); it is checked
like any other, so a cluster whose workers cannot see it is told to pass ``scratch=`` (or a
``checkpoint=``) rather than given zeros.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
import uuid
from typing import Any

import dask.array as da

from daskrecon.errors import OverwriteSourceError, StorageNotSharedError
from daskrecon.runtime.waiting import bounded
from daskrecon.tasks import storage as storage_tasks

__all__ = [
    "OWNER_ATTR",
    "OWNER_FILE",
    "check_not_source",
    "check_shared",
    "check_sources_seen",
    "default_scratch",
    "location",
    "owned",
    "owner_attributes",
    "relation",
    "seen_inputs",
    "strict_sources",
    "zarr_arrays",
    "zarr_arrays_in",
    "zarr_sources",
]

#: The file that marks a folder as daskrecon's (a checkpoint, a scratch folder).
OWNER_FILE = ".daskrecon.json"
#: The Zarr attribute that marks an array as daskrecon's.
OWNER_ATTR = "daskrecon"

#: What to pass when a location is not shared, for messages.
HINT = ("pass checkpoint= (or scratch=) a folder that the driver and every worker see — a shared file system "
        "such as the cluster's parallel file system or NFS home — or an fsspec URL (s3://…, gs://…)")


def default_scratch() -> str:
    """The folder under which runs without ``scratch=`` make their scratch folders: the driver's temporary directory."""
    return tempfile.gettempdir()


def owner_attributes(role: str) -> dict:
    """The Zarr attributes of an array daskrecon creates (``role``: ``"state"``, ``"scratch"``...)."""
    return {OWNER_ATTR: {"role": role}}


def owned(zarr_array: Any) -> bool:
    """Whether ``zarr_array`` was created by daskrecon (it carries :data:`OWNER_ATTR`)."""
    try:
        return OWNER_ATTR in zarr_array.attrs
    except (AttributeError, KeyError, TypeError):
        return False


def location(path: str) -> str:
    """``path`` in a form comparable with another: local paths absolute with symlinks resolved,
    URLs as they are (without a trailing ``/``)."""
    path = str(path).removeprefix("file://")
    if "://" in path:
        return path.rstrip("/")
    return os.path.realpath(path)


def relation(a: str, b: str) -> str | None:
    """How location ``a`` stands to ``b`` (both as :func:`location` gives them): ``"is"``, ``"holds"``,
    ``"lies inside"``, or None when they are apart."""
    if a == b:
        return "is"
    if b.startswith(a.rstrip("/") + "/"):
        return "holds"
    if a.startswith(b.rstrip("/") + "/"):
        return "lies inside"
    return None


def _zarr_location(a: Any) -> str | None:
    store = a.store
    root = getattr(store, "root", None)  # a LocalStore
    if root is not None:
        base = location(str(root))
    else:  # an FsspecStore (what dask.array.from_zarr opens paths with)
        fs, path = getattr(store, "fs", None), getattr(store, "path", None)
        if fs is None or path is None:
            return None  # a memory store: nothing on disk to overwrite
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
        base = location(path) if protocol in ("file", "local") else f"{protocol}://{path.rstrip('/')}"
    return posixpath.join(base, a.path) if a.path else base


def zarr_arrays(x: Any) -> list[Any]:
    """The Zarr arrays (``zarr.Array`` objects) that dask array ``x`` reads, found in its graph's tasks."""
    return zarr_arrays_in(*dict(x.__dask_graph__()).values())


def zarr_arrays_in(*values: Any) -> list[Any]:
    """The Zarr arrays found in ``values`` (dask tasks, xarray's lazy wrappers, containers), each once."""
    import zarr

    found: dict[int, Any] = {}
    seen: set[int] = set()

    def walk(v: Any, depth: int = 0) -> None:
        if depth > 8 or id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, zarr.Array):
            found[id(v)] = v
        elif isinstance(v, storage_tasks.StrictSource):
            walk(v.source, depth + 1)
        elif type(v).__module__.startswith("xarray."):  # xarray's lazy indexing chain around a backend array
            for attr in ("array", "_array"):
                inner = getattr(v, attr, None)
                if inner is not None:
                    walk(inner, depth + 1)
        elif isinstance(v, tuple | list):
            for item in v:
                walk(item, depth + 1)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item, depth + 1)
        else:  # dask's task objects: a Task's arguments, a DataNode's value
            for attr in ("value", "args", "kwargs"):
                inner = getattr(v, attr, None)
                if inner is not None and not callable(inner):
                    walk(inner, depth + 1)

    for v in values:
        walk(v)
    return list(found.values())


def strict_sources(x: Any) -> Any:
    """``x`` reading its Zarr inputs through :class:`~daskrecon.tasks.storage.StrictSource`: a worker that cannot open one
    raises instead of reading zeros.

    The graph's chunk sources (the values that ``dask.array.from_zarr`` and xarray's ``open_zarr``
    put in a layer of their own, which the chunk tasks index) are wrapped; the keys stay the same.
    Anything else — tensors, arrays that read no Zarr array on disk, sources inlined into the
    chunk tasks (``from_zarr(..., inline_array=True)``: checked when the call starts, not per
    worker) — comes back unchanged.
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    graph = getattr(x, "dask", None)
    if not isinstance(x, da.Array) or not isinstance(graph, HighLevelGraph):
        return x
    layers, changed = dict(graph.layers), False
    for name, layer in graph.layers.items():
        if not isinstance(layer, MaterializedLayer):
            continue
        mapping, wrapped = dict(layer.mapping), False
        for key, value in mapping.items():
            # dask's graph nodes by name: a DataNode holds a value; Task, Alias, … compute one
            node = type(value).__module__.startswith("dask.") and hasattr(value, "key")
            source = value.value if node and type(value).__name__ == "DataNode" else None if node else value
            if source is None or isinstance(source, tuple | storage_tasks.StrictSource) or callable(source):
                continue  # a task, or already strict
            arrays = [(a, w) for a in zarr_arrays_in(source) if (w := _zarr_location(a)) is not None]
            if not arrays:
                continue
            strict = storage_tasks.StrictSource(source, [a for a, _ in arrays], [w for _, w in arrays])
            mapping[key] = type(value)(key, strict) if node else strict
            wrapped = True
        if wrapped:
            layers[name] = MaterializedLayer(mapping, annotations=layer.annotations)
            changed = True
    if not changed:
        return x
    return da.Array(HighLevelGraph(layers, graph.dependencies), x.name, x.chunks, meta=x._meta)


def seen_inputs(ctx: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """:func:`check_sources_seen`, then each input through :func:`strict_sources`: the workers present now are
    checked at once, those that join later at their first read."""
    check_sources_seen(ctx, inputs)
    return {name: strict_sources(x) for name, x in inputs.items()}


def zarr_sources(x: Any) -> list[str]:
    """Where the Zarr arrays that dask array ``x`` reads live (as :func:`location` gives them)."""
    return sorted({where for a in zarr_arrays(x) if (where := _zarr_location(a)) is not None})


def check_not_source(x: Any, path: str) -> None:
    """Refuse to write (or replace) ``path`` when dask array ``x`` reads from a Zarr array there or inside it.

    Raises
    ------
    OverwriteSourceError
        Naming the array read and the path.
    """
    target = location(path)
    for src in zarr_sources(x):
        if relation(target, src):
            raise OverwriteSourceError(
                f"{path!r} holds the Zarr array {src!r} that the array to write is read from: replacing it would "
                f"delete the data before it is read; write to another path (and move it afterwards)")


def check_sources_seen(ctx: Any, inputs: dict[str, Any]) -> float:
    """Check that every current worker opens the Zarr arrays the dask arrays in ``inputs`` read; the seconds it took.

    A worker that cannot see an input's store would read each chunk as missing, and Zarr gives a
    missing chunk its fill value: the input, silently, as zeros. The workers read each array's
    metadata back through its own store (one ``Client.run`` for all, bounded by the context's
    ``stall_timeout``); nothing is written (the arrays are the user's). Arrays in memory stores and
    inputs that read no Zarr array pass without a call.

    Raises
    ------
    StorageNotSharedError
        Naming the input, the array's location, the workers that cannot open it and what they saw.
    """
    t0 = time.perf_counter()
    arrays, owners = [], []
    for name, x in inputs.items():
        if not hasattr(x, "__dask_graph__"):
            continue
        for a in zarr_arrays(x):
            where = _zarr_location(a)
            if where is not None:
                arrays.append(a)
                owners.append((name, where))
    if not arrays:
        return 0.0
    client = ctx.client
    seen = bounded(client, client._run, storage_tasks.open_sources, arrays, on_error="return",
                   what="checking that the workers see the inputs' Zarr arrays", timeout=ctx.stall_timeout)
    for k, (name, where) in enumerate(owners):
        bad = {w: (v[k][1:] if isinstance(v, list) else str(v)) for w, v in sorted(seen.items())
               if not isinstance(v, list) or v[k]}
        if bad:
            which = "; ".join(f"{w}: {reason}" for w, reason in bad.items())
            raise StorageNotSharedError(
                f"{name} reads the Zarr array {where!r}, which {len(bad)} of {len(seen)} workers cannot open ({which}): "
                f"they would read every chunk of it as missing, that is as zeros. Put the input where the driver and "
                f"every worker see it — a shared file system, or an fsspec URL (s3://…, gs://…) — or pass it as a "
                f"tensor")
    return time.perf_counter() - t0


def check_shared(ctx: Any, fs: Any, root: str, url: str, *, why: str = "", hint: str = HINT) -> float:
    """Check that every current worker reads what the driver writes under ``root``; return the seconds it took.

    The driver writes a probe file with a fresh random token into ``root`` (an existing
    folder of the fsspec file system ``fs``; ``url`` names it in messages); each worker reads
    it through its own copy of ``fs`` (one ``Client.run``, bounded by the context's
    ``stall_timeout``); the probe is removed.

    A cluster with no workers yet passes: callers check again when the workers change.

    Raises
    ------
    StorageNotSharedError
        Some worker read nothing, or something else: the message names ``url``, those
        workers and what they saw, ``why`` the location is needed, and ``hint``.
    """
    t0 = time.perf_counter()
    token = uuid.uuid4().hex
    probe = posixpath.join(str(root), f".daskrecon-probe-{token}")
    client = ctx.client
    fs.pipe_file(probe, token.encode())
    try:
        seen = bounded(client, client._run, storage_tasks.read_probe, fs, probe, on_error="return",
                       what=f"checking that the workers see {url!r}", timeout=ctx.stall_timeout)
    finally:
        fs.rm_file(probe)
    bad = {w: (v[1:] if isinstance(v, str) and v.startswith("!") else f"read {v!r}")
           for w, v in sorted(seen.items()) if v != token}
    if bad:
        which = "; ".join(f"{w}: {reason}" for w, reason in bad.items())
        raise StorageNotSharedError(
            f"{len(bad)} of {len(seen)} workers cannot see {url!r}{f' ({why})' if why else ''}: the driver wrote a probe "
            f"file there that they cannot read back ({which}). They would write their chunks to a folder of their own "
            f"that nobody else reads. {hint[0].upper()}{hint[1:]}")
    return time.perf_counter() - t0
