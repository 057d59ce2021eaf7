"""Regions of Zarr arrays read inside tasks (daskrecon.tasks.regions): zarr-python's values, raw chunks read in place."""

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from daskrecon.tasks import regions


@given(st.integers(-30, 30), st.integers(0, 60), st.integers(1, 25))
@settings(max_examples=400)
def test_periodic_segments_cover_the_wrapped_range_once(lo, length, n):
    hi = lo + length
    runs = regions.segments(lo, hi, n, True)
    got = np.empty(length, dtype=int)
    for start, stop, dst in runs:
        assert 0 <= start < stop <= n
        got[dst:dst + stop - start] = np.arange(start, stop)
    np.testing.assert_array_equal(got, np.arange(lo, hi) % n)
    assert sum(stop - start for start, stop, _ in runs) == length


def test_a_region_outside_a_non_periodic_axis_is_refused():
    with pytest.raises(IndexError, match="outside"):
        regions.segments(-1, 5, 10, False)


def _array(tmp_path, name, **kw):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 3, 37, 29)).astype(kw.pop("dtype", np.float32))
    z = zarr.create_array(tmp_path / name, shape=data.shape, dtype=data.dtype, chunks=(1, 2, 10, 8), **kw)
    z[:] = data
    return z, data


def _regions(rng, shape, count=60):
    for _ in range(count):
        where = []
        for n in shape:
            periodic = bool(rng.integers(2))
            if periodic:
                lo = int(rng.integers(-n // 2, n))
                hi = lo + int(rng.integers(1, n + n // 2))
            else:
                lo = int(rng.integers(0, n))
                hi = int(rng.integers(lo + 1, n + 1))
            where.append((lo, hi, periodic))
        yield tuple(where)


def _reference(data, lead, where):
    sel = data[lead]
    for ax, (lo, hi, _) in enumerate(where):
        sel = np.take(sel, np.arange(lo, hi) % sel.shape[ax], axis=ax)
    return sel


def test_raw_chunks_are_read_in_place_with_zarrs_values(tmp_path, monkeypatch):
    z, data = _array(tmp_path, "raw.zarr", compressors=None)
    assert regions.direct_layout(z) is not None

    def refuse(*_, **__):
        raise AssertionError("zarr-python read a region the chunk files hold raw")

    monkeypatch.setattr(zarr.Array, "__getitem__", refuse)
    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection", refuse)
    rng = np.random.default_rng(0)
    for where in _regions(rng, data.shape[1:]):
        got = regions.read_region(z, (1,), where)
        np.testing.assert_array_equal(got, _reference(data, 1, where))
        assert got.dtype == data.dtype


def test_raw_big_endian_chunks_are_read_in_place_byte_swapped(tmp_path):
    from zarr.codecs import BytesCodec

    z, data = _array(tmp_path, "big.zarr", compressors=None, serializer=BytesCodec(endian="big"), dtype=np.float64)
    layout = regions.direct_layout(z)
    assert layout is not None and layout[2] == np.dtype(">f8")
    for where in _regions(np.random.default_rng(2), data.shape[1:], 20):
        got = regions.read_region(z, (1,), where)
        np.testing.assert_array_equal(got, _reference(data, 1, where))
        assert got.dtype == np.float64


@pytest.mark.parametrize("kind", ["zstd", "v2"])
def test_other_arrays_read_through_zarr_with_the_same_values(tmp_path, kind):
    kw = {"zstd": {}, "v2": {"zarr_format": 2, "compressors": None}}[kind]
    z, data = _array(tmp_path, f"{kind}.zarr", **kw)
    assert regions.direct_layout(z) is None
    rng = np.random.default_rng(1)
    for where in _regions(rng, data.shape[1:], 20):
        np.testing.assert_array_equal(regions.read_region(z, (0,), where), _reference(data, 0, where))


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    z = zarr.create_array(tmp_path / "sparse.zarr", shape=(20, 20), chunks=(8, 8), dtype=np.float32,
                          compressors=None, fill_value=-2.5)
    z[8:16, 8:16] = 1.0
    got = regions.read_region(z, (), ((4, 18, False), (-3, 12, True)))
    np.testing.assert_array_equal(got, _reference(z[:], (), ((4, 18, False), (-3, 12, True))))
    assert (got == -2.5).any() and (got == 1.0).any()


def test_a_chunk_file_of_another_size_is_left_to_zarr(tmp_path):
    z, _ = _array(tmp_path, "odd.zarr", compressors=None)
    layout = regions.direct_layout(z)
    index = tuple(regions.segments(lo, hi, n, False) for lo, hi, n in ((0, 1, 2), (0, 3, 3), (0, 37, 37), (0, 29, 29)))
    assert regions._read_direct(z, layout, index, (1, 3, 37, 29)) is not None
    chunk = tmp_path / "odd.zarr" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes() + b"\0")  # not a raw chunk any more: not ours to interpret
    assert regions._read_direct(z, layout, index, (1, 3, 37, 29)) is None
