"""OwnedFolder: claimed before the first write, checked shared once per worker set, removed only when all ours."""

import hashlib
import os

import numpy as np
import pytest
import zarr

from daskrecon.errors import NotOwnedError, StorageNotSharedError
from daskrecon.runtime import storage
from daskrecon.runtime.folders import OwnedFolder


def _hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path):
    new = OwnedFolder(tmp_path / "new")
    assert not new.owned()
    new.claim()
    assert new.owned() and os.path.isfile(tmp_path / "new" / storage.OWNER_FILE)
    (tmp_path / "empty").mkdir()
    empty = OwnedFolder(tmp_path / "empty")
    empty.claim()
    assert empty.owned()


def test_someone_elses_folder_is_refused_and_overwrite_adds_only_the_mark(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    zarr.create_array(str(theirs / "x.zarr"), shape=(4,), dtype="f4")[:] = np.arange(4)
    before = _hashes(theirs)
    with pytest.raises(NotOwnedError, match=r"notes.txt, x.zarr.*overwrite=True"):
        OwnedFolder(theirs).claim()
    assert _hashes(theirs) == before
    folder = OwnedFolder(theirs)
    folder.claim(overwrite=True)
    after = _hashes(theirs)
    assert set(after) - set(before) == {storage.OWNER_FILE} and all(after[k] == v for k, v in before.items())
    assert not folder.owns_array(folder.path_of("x.zarr"))  # their array stays theirs
    folder.remove()  # holds something that is not ours: kept whole
    assert _hashes(theirs) == after


def test_a_reserved_name_that_is_not_ours_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "COMMIT.json").write_text("{}")
    with pytest.raises(NotOwnedError, match="COMMIT.json"):
        OwnedFolder(tmp_path, reserved=("COMMIT.json",)).claim(overwrite=True)
    assert not OwnedFolder(tmp_path).owned()


def test_remove_deletes_a_folder_of_only_our_arrays(tmp_path):
    folder = OwnedFolder(tmp_path / "ours", reserved=("COMMIT.json",))
    folder.claim()
    zarr.create_array(folder.path_of("s.zarr"), shape=(2,), dtype="f4", attributes=storage.owner_attributes("scratch"))
    (tmp_path / "ours" / "COMMIT.json").write_text("{}")
    assert folder.owns_array(folder.path_of("s.zarr"))
    folder.remove()
    assert not (tmp_path / "ours").exists()


def test_children_share_the_parents_sharing_record_and_names_are_one_component(tmp_path):
    parent = OwnedFolder(tmp_path / "p", reserved=("COMMIT.json",))
    child = parent.child("scratch_cg")
    assert child.shared is parent.shared and child.reserved == parent.reserved
    assert child.root == os.path.join(parent.root, "scratch_cg")
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="one path component"):
            parent.child(bad)


def test_a_temporary_folder_is_checked_once_per_worker_set(ctx, tmp_path):
    folder = OwnedFolder.temporary(ctx, tmp_path, prefix="t-")
    assert folder.owned() and os.path.basename(folder.root).startswith("t-")
    assert len(folder.shared.seconds) == 1 and folder.shared.workers == frozenset(ctx.workers())
    folder.ensure_shared(ctx)
    folder.child("inner").ensure_shared(ctx)
    assert len(folder.shared.seconds) == 1
    folder.remove()
    assert not os.path.exists(folder.root)


def test_a_temporary_folder_the_workers_cannot_see_is_refused_and_removed(ctx):
    from fsspec.implementations.memory import MemoryFileSystem

    with pytest.raises(StorageNotSharedError, match=r"cannot see .*\(a test\)"):
        OwnedFolder.temporary(ctx, "memory://daskrecon-folders-test", why="a test")
    fs = MemoryFileSystem()  # the driver's in-process store: the workers each have their own
    left = fs.ls("/daskrecon-folders-test", detail=False) if fs.exists("/daskrecon-folders-test") else []
    assert left == []


def test_a_location_the_driver_cannot_reach_is_named_with_the_storage_librarys_error(tmp_path, monkeypatch):
    """s3fs without credentials raised botocore's NoCredentialsError from deep inside the first claim."""
    from daskrecon.errors import StorageUnreachableError

    folder = OwnedFolder(tmp_path / "ck")

    def no_credentials(path, **kw):
        raise PermissionError("Unable to locate credentials")

    monkeypatch.setattr(folder.fs, "exists", no_credentials)
    with pytest.raises(StorageUnreachableError, match=r"cannot reach '.*ck' \(the folder daskrecon would write to\): "
                                                      r"PermissionError: Unable to locate credentials") as err:
        folder.claim()
    assert isinstance(err.value.__cause__, PermissionError) and isinstance(err.value, OSError)
    assert not (tmp_path / "ck").exists()  # nothing written
