"""Client data binding (fedlang.backends.data, docs/data.md): the specs, TFF's on-disk layouts
written here byte for byte as TFF writes them, the binding rules, and the errors' exact texts."""

from __future__ import annotations

import lzma
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlang.backends.data import (DEFAULT_BATCH_SIZE, ArraySource, DataError, bind, clear_cache, digits_w1,
                                   open_source)
from fedlang.ir.values import Struct
from fedlang.types import parse

BATCHES = parse("<x=float32[?,64],y=int32[?]>*")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


def source(per_client: dict[str, dict[str, np.ndarray]], name: str = "mem") -> ArraySource:
    return ArraySource(name, list(per_client), per_client=list(per_client.values()))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        fn(*args, **kwargs)
    return str(caught.value)


# ---- TFF's layouts, written as TFF writes them ----------------------------------------------------

def tf_example(features: dict[str, np.ndarray]) -> bytes:
    """TFF's sql_client_data_utils serializer: floats -> float_list, ints -> int64_list, flattened."""
    import tensorflow as tf

    feature = {}
    for key, value in features.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=value.flatten()))
        elif value.dtype.kind in "iub":
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=value.flatten()))
        else:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tff_sqlite(path, splits: dict[str, dict[str, list[dict]]], interleave=False, index=False):
    """The SqlClientData layout (TFF's save_to_sql_client_data schema, its split names as given)."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                    "serialized_example_proto BLOB NOT NULL);")
        con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                    "num_examples INTEGER NOT NULL);")
        if index:
            con.execute("CREATE INDEX examples_client ON examples (client_id)")
        rows = []
        for split, clients in splits.items():
            for client, examples in clients.items():
                rows += [(k, split, client, tf_example(e)) for k, e in enumerate(examples)]
                con.execute("INSERT INTO client_metadata (client_id, split_name, num_examples) VALUES (?, ?, ?);",
                            (client, split, len(examples)))
        if interleave:                                   # clients' rows not contiguous
            rows.sort(key=lambda r: r[0])
        con.executemany("INSERT INTO examples (split_name, client_id, serialized_example_proto) "
                        "VALUES (?, ?, ?);", [r[1:] for r in rows])
    con.close()
    return path


def emnist_like(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"pixels": rng.random((28, 28), dtype=np.float32), "label": np.int64(rng.integers(10))}
            for _ in range(n)]


def emnist_file(tmp_path, **kwargs):
    splits = {"digits_only_train": {"f0001_41": emnist_like(1, 5), "f0000_14": emnist_like(2, 3),
                                    "f0002_07": emnist_like(3, 0)},
              "digits_only_test": {"f0000_14": emnist_like(4, 2)}}
    return write_tff_sqlite(tmp_path / "emnist_all.sqlite", splits, **kwargs), splits


def stacked(examples: list[dict], key: str) -> np.ndarray:
    return np.stack([np.asarray(e[key]) for e in examples])


EMNIST_BATCHES = parse("<pixels=float32[?,28,28],label=int32[?]>*")


@pytest.mark.parametrize("layout", [{}, {"interleave": True}, {"index": True}])
def test_tff_sqlite_loads_and_reshapes_flat_features(tmp_path, layout):
    path, splits = emnist_file(tmp_path, **layout)
    src = open_source(f"{path}:digits_only_train")
    assert src.client_ids == ["f0000_14", "f0001_41", "f0002_07"]            # sorted, as TFF sorts
    raw = src.examples(1)
    assert raw["pixels"].shape == (5, 784) and raw["pixels"].dtype == np.float32
    assert raw["label"].shape == (5, 1) and raw["label"].dtype == np.int64
    values = bind(src, EMNIST_BATCHES, batch_size=2)
    expected = splits["digits_only_train"]["f0001_41"]
    assert [b.pixels.shape for b in values[1]] == [(2, 28, 28), (2, 28, 28), (1, 28, 28)]
    np.testing.assert_array_equal(np.concatenate([b.pixels for b in values[1]]), stacked(expected, "pixels"))
    np.testing.assert_array_equal(np.concatenate([b.label for b in values[1]]), stacked(expected, "label"))
    assert values[1][0].label.dtype == np.int32
    assert values[2] == []                                                   # a client without rows
    singles = bind(src, parse("<pixels=float32[28,28],label=int32>*"), clients=[0])[0]
    assert len(singles) == 3 and singles[2].label.shape == () and singles[2].pixels.shape == (28, 28)
    test = open_source(f"{path}:digits_only_test")
    assert test.client_ids == ["f0000_14"] and len(test.examples(0)["label"]) == 2


def test_tff_sqlite_splits(tmp_path):
    path, _ = emnist_file(tmp_path)
    assert error_of(open_source, str(path)) == (
        f"{path}: the file holds several splits; name one as {path}:SPLIT, one of "
        f"'digits_only_test', 'digits_only_train'")
    assert error_of(open_source, f"{path}:all_train") == (
        f"{path}:all_train: no split 'all_train' in the file; its splits are 'digits_only_test', "
        f"'digits_only_train'")
    # TFF's own writer puts everything in split 'N/A': one split needs no name.
    one = write_tff_sqlite(tmp_path / "one.sqlite", {"N/A": {"a": emnist_like(5, 2)}})
    assert open_source(str(one)).client_ids == ["a"]


def test_tff_sqlite_lzma_decompresses_once_into_the_cache(tmp_path, monkeypatch):
    path, splits = emnist_file(tmp_path)
    packed = tmp_path / "emnist_all.sqlite.lzma"
    packed.write_bytes(lzma.compress(path.read_bytes()))
    path.unlink()
    src = open_source(f"{packed}:digits_only_train")
    cached = list((tmp_path / "cache" / "fedlang").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("emnist_all-") and cached[0].suffix == ".sqlite"
    np.testing.assert_array_equal(bind(src, EMNIST_BATCHES)[0][0].label,
                                  stacked(splits["digits_only_train"]["f0000_14"], "label"))
    clear_cache()
    monkeypatch.setattr(lzma, "open", lambda *a, **k: pytest.fail("decompressed twice"))
    assert open_source(f"{packed}:digits_only_test").client_ids == ["f0000_14"]


def test_tff_sqlite_bad_files(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert error_of(open_source, str(junk)).startswith(f"{junk}: not a readable SQLite database")
    bad_lzma = tmp_path / "junk.sqlite.lzma"
    bad_lzma.write_bytes(b"\xfd7zXZ\x00 garbage")
    assert error_of(open_source, str(bad_lzma)).startswith(f"{bad_lzma}: not a readable .lzma file")
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "cache" / "fedlang").iterdir())
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)")
    con.close()
    assert error_of(open_source, str(other)) == (
        f"{other}: no table 'client_metadata' in the database; TFF's layout is examples(split_name, "
        f"client_id, serialized_example_proto) and client_metadata(client_id, split_name, num_examples)")


def test_tff_sqlite_row_that_is_not_an_example(tmp_path):
    path = write_tff_sqlite(tmp_path / "g.sqlite", {"train": {"c1": emnist_like(0, 1)}})
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO examples VALUES ('train', 'c1', x'ffffffff')")
    con.close()
    assert error_of(open_source(str(path)).examples, 0).startswith(
        f"{path}: client c1: a row is not a serialized tf.train.Example")


def test_tff_sqlite_ragged_feature(tmp_path):
    path = write_tff_sqlite(tmp_path / "r.sqlite", {"train": {"c1": [{"v": np.zeros(3, np.float32)},
                                                                      {"v": np.zeros(4, np.float32)}]}})
    src = open_source(str(path))
    assert error_of(src.examples, 0) == (
        f"{path}: client c1, field 'v': examples hold different numbers of values (3 and 4); fedlang "
        f"binds fixed-size features only")


def test_flat_feature_of_the_wrong_size(tmp_path):
    path, _ = emnist_file(tmp_path)
    spec = f"{path}:digits_only_train"
    assert error_of(bind, open_source(spec), parse("<pixels=float32[?,28,27],label=int32[?]>*")) == (
        f"{spec}: client f0000_14, field 'pixels': declared float32[?,28,27], found float32 examples "
        f"of shape [784]")


# ---- HDF5 and npz folders -------------------------------------------------------------------------

def test_tff_hdf5(tmp_path):
    import h5py

    path = tmp_path / "fed_emnist_digitsonly_train.h5"
    rng = np.random.default_rng(0)
    data = {"f1": (rng.random((3, 28, 28), dtype=np.float32), np.array([1, 2, 3], np.int32)),
            "f0": (rng.random((20, 28, 28), dtype=np.float32), np.arange(20, dtype=np.int32) % 10)}
    with h5py.File(path, "w") as h5:
        for client, (pixels, label) in data.items():
            h5.create_dataset(f"examples/{client}/pixels", data=pixels)
            h5.create_dataset(f"examples/{client}/label", data=label)
    src = open_source(str(path))
    assert src.client_ids == ["f0", "f1"]
    values = bind(src, EMNIST_BATCHES)
    assert [len(b.label) for b in values[0]] == [16, 4]
    np.testing.assert_array_equal(np.concatenate([b.pixels for b in values[0]]), data["f0"][0])
    assert error_of(open_source, f"{path}:train").startswith(f"{path}:train: only TFF SQLite files have splits")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\0" * 100)
    assert error_of(open_source, str(junk)).startswith(f"{junk}: not a readable HDF5 file")
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as h5:
        h5.create_group("other")
    assert error_of(open_source, str(empty)) == (
        f"{empty}: no group /examples in the file; TFF's HDF5 client data keeps client C's feature F at "
        f"/examples/C/F")


def test_npz_folder(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    for cid, n in [("10", 3), ("2", 5), ("1", 0)]:
        np.savez(folder / f"{cid}.npz", x=np.full((n, 4), int(cid), np.float64), y=np.arange(n), note=np.zeros(n))
    (folder / "README.txt").write_text("ignored")
    src = open_source(str(folder))
    assert src.client_ids == ["1", "2", "10"]                                 # natural order
    values = bind(src, parse("<x=float32[?,4],y=int32[?]>*"), batch_size=2)
    assert values[0] == [] and [len(b.y) for b in values[1]] == [2, 2, 1]
    assert values[2][0].x.dtype == np.float32 and values[2][0].y.dtype == np.int32


def test_npz_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_of(open_source, str(empty)) == (
        f"{empty}: the folder holds no .npz files; put one file per client in it, named CLIENT_ID.npz, "
        f"with one array per feature (leading axis = examples)")
    folder = tmp_path / "bad"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.array([{"pickled": 1}], dtype=object))
    (folder / "b.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(folder / "c.npz", x=np.float32(1.0))
    src = open_source(str(folder))
    assert error_of(src.examples, 0) == (f"{folder}: client a: a.npz holds Python objects, which fedlang "
                                         f"never unpickles; save plain numeric or string arrays")
    assert error_of(src.examples, 1).startswith(f"{folder}: client b: cannot read b.npz")
    assert error_of(src.examples, 2) == (f"{folder}: client c, field 'x': stored as a single float32 with "
                                         f"no example axis; store it with shape [1] for one example")


# ---- built-ins ------------------------------------------------------------------------------------

def test_digits_split_matches_benchmarks():
    from sklearn.datasets import load_digits

    data = digits_w1()
    sizes = np.array([len(y) for y in data.client_y])
    assert (sizes.min(), np.median(sizes), sizes.max(), sizes.sum()) == (3, 14, 33, 1500)
    assert data.x_test.shape == (297, 64) and data.y_test.shape == (297,)
    # An independent reading of BENCHMARKS "Exact choices".
    d = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    x, y = (d.data / 16).astype(np.float32)[perm], d.target.astype(np.int32)[perm]
    rng = np.random.default_rng(1)
    clients = [[] for _ in range(100)]
    for c in range(10):
        p = rng.dirichlet(0.5 * np.ones(100))
        idx = np.flatnonzero(y[:1500] == c)
        for i, part in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
            clients[i] += list(part)
    for i in range(100):
        ix = sorted(clients[i])
        np.testing.assert_array_equal(data.client_x[i], x[ix])
        np.testing.assert_array_equal(data.client_y[i], y[ix])
        assert data.client_x[i].dtype == np.float32 and data.client_y[i].dtype == np.int32
    np.testing.assert_array_equal(data.x_test, x[1500:])
    rng = np.random.default_rng(2)
    l1, l2 = np.sqrt(6 / 96), np.sqrt(6 / 42)
    np.testing.assert_array_equal(data.w1, rng.uniform(-l1, l1, (64, 32)).astype(np.float32))
    np.testing.assert_array_equal(data.w2, rng.uniform(-l2, l2, (32, 10)).astype(np.float32))
    assert not data.b1.any() and data.b1.shape == (32,) and data.b2.shape == (10,)
    again = digits_w1.__wrapped__()                                          # deterministic
    assert all(np.array_equal(a, b) for a, b in zip(again.client_x, data.client_x))
    npz = data.npz_arrays()
    assert {"x_0", "y_99", "x_test", "y_test", "w1", "b1", "w2", "b2"} <= set(npz) and len(npz) == 206


def test_digits_sources():
    train = open_source("digits")
    assert train.client_ids == [str(i) for i in range(100)] and open_source("digits") is train
    assert sum(len(train.examples(i)["y"]) for i in range(100)) == 1500
    test = open_source("digits:test")
    assert test.client_ids == ["test"] and test.examples(0)["x"].shape == (297, 64)
    batches = bind(test, BATCHES)[0]
    assert len(batches) == 19 and len(batches[-1].y) == 297 - 18 * 16
    assert error_of(open_source, "digits:val").startswith("digits:val: digits has the splits train")


def test_sensors():
    src = open_source("sensors:40")
    assert src.client_ids == [str(i) for i in range(40)]
    readings = bind(src, parse("float32"))
    assert all(r.shape == () and r.dtype == np.float32 for r in readings)
    assert [float(r) for r in readings] == [20 + (i % 17) * 0.5 for i in range(40)]
    assert bind(src, parse("{float32}@CLIENTS"), clients=[3]) == [np.float32(21.5)]
    assert bind(src, parse("<temperature=float32>"), clients=[1])[0] == Struct.of(temperature=np.array(20.5, np.float32))
    assert len(open_source("sensors").client_ids) == 100
    for bad in ("sensors:0", "sensors:-3", "sensors:many", "sensors:1.5"):
        assert error_of(open_source, bad) == (f"{bad}: the number of sensors must be a whole number of "
                                              f"at least 1, as in sensors:1000")


def test_bad_specs(tmp_path):
    assert error_of(open_source, "mnist") == (
        "unknown data set 'mnist': built-in data sets are digits, digits:test, sensors and sensors:N; "
        "anything else is a path: a folder of CLIENT_ID.npz files, a TFF .sqlite or .sqlite.lzma file "
        "(FILE:SPLIT picks a split), or a TFF .h5 file")
    missing = tmp_path / "nope.sqlite"
    assert error_of(open_source, f"{missing}:train") == (
        f"{missing}:train: no such file or folder: {missing}; check the path (relative paths start from "
        f"the current folder)")
    assert error_of(open_source, "").startswith("empty data spec")
    one = tmp_path / "client.npz"
    np.savez(one, x=np.zeros(3))
    assert "put one CLIENT_ID.npz file per client in a folder" in error_of(open_source, str(one))
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"\x00\x01")
    assert error_of(open_source, str(odd)).startswith(f"{odd}: cannot tell the format of {odd}")


def test_no_tensorflow_unless_sqlite():
    code = ("import sys\nfrom fedlang.backends.data import open_source, bind\nfrom fedlang.types import parse\n"
            "bind(open_source('sensors:3'), parse('float32'))\n"
            "assert 'tensorflow' not in sys.modules and 'h5py' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- binding rules --------------------------------------------------------------------------------

def client_data(counts: list[int], seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    return source({f"c{i}": {"x": rng.standard_normal((n, 3)).astype(np.float32),
                             "y": rng.integers(0, 10, n).astype(np.int32),
                             "extra": np.zeros((n, 7))} for i, n in enumerate(counts)})


@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=5), batch=st.integers(1, 20),
       bare=st.booleans())
def test_batches_are_the_examples_in_order(counts, batch, bare):
    src = client_data(counts)
    t = parse("float32[?,3]*") if bare else parse("<x=float32[?,3],y=int32[?]>*")
    if bare:
        src = source({c: {"x": src.examples(i)["x"]} for i, c in enumerate(src.client_ids)})
    for i, batches in enumerate(bind(src, t, batch_size=batch)):
        n = counts[i]
        assert len(batches) == -(-n // batch)
        xs = [b if bare else b.x for b in batches]
        assert all(len(x) == batch for x in xs[:-1]) and all(0 < len(x) <= batch for x in xs)
        np.testing.assert_array_equal(np.concatenate(xs) if xs else np.zeros((0, 3), np.float32),
                                      src.examples(i)["x"])
        if not bare:
            assert all(b.names == ("x", "y") and len(b.y) == len(b.x) for b in batches)
            assert [int(v) for b in batches for v in b.y] == list(src.examples(i)["y"])


@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=4), fixed=st.integers(1, 9))
def test_fixed_batch_dimension_drops_the_remainder(counts, fixed):
    src = client_data(counts)
    values = bind(src, parse(f"<x=float32[{fixed},3],y=int32[{fixed}]>*"))
    for i, batches in enumerate(values):
        assert len(batches) == counts[i] // fixed and all(b.x.shape == (fixed, 3) for b in batches)
        kept = counts[i] - counts[i] % fixed
        np.testing.assert_array_equal(np.concatenate([b.y for b in batches]) if batches else np.zeros(0),
                                      src.examples(i)["y"][:kept])


def test_default_batch_size_and_single_examples():
    src = client_data([40, 0])
    assert [len(b.y) for b in bind(src, parse("<x=float32[?,3],y=int32[?]>*"))[0]] == [16, 16, 8]
    assert DEFAULT_BATCH_SIZE == 16
    singles = bind(src, parse("<x=float32[3],y=int32>*"))
    assert len(singles[0]) == 40 and singles[1] == []
    assert singles[0][5].x.shape == (3,) and singles[0][5].y.shape == () and isinstance(singles[0][5].y, np.ndarray)
    np.testing.assert_array_equal(singles[0][5].x, src.examples(0)["x"][5])
    # A fixed leading dimension that is the stored example shape: single examples, not batches.
    assert len(bind(src, parse("<x=float32[3]>*"))[0]) == 40
    assert error_of(bind, src, parse("<x=float32[4,3],y=int32[4]>*"), batch_size=8) == (
        "mem: client c0, field 'x': declared float32[4,3] fixes batches of 4, but batch size 8 was asked "
        "for; write ? for the batch dimension to choose it at run time")


def test_batches_are_views_and_cached_data_is_read_only():
    src = client_data([20])
    batch = bind(src, parse("<x=float32[?,3],y=int32[?]>*"))[0][0]
    assert np.shares_memory(batch.x, src.examples(0)["x"]) and not batch.x.flags.writeable


@given(value=st.integers(-2**63, 2**63 - 1))
def test_int64_narrows_to_int32_only_when_it_fits(value):
    src = source({"7": {"y": np.array([1, value, 2], np.int64)}})
    t = parse("<y=int32[?]>*")
    if -2**31 <= value < 2**31:
        [[batch]] = bind(src, t)
        assert batch.y.dtype == np.int32 and batch.y.tolist() == [1, value, 2]
    else:
        assert error_of(bind, src, t) == (f"mem: client 7, field 'y': declared int32[?], found int64 value "
                                          f"{value}, which does not fit int32; declare int64")


def test_conversions_are_only_the_lossless_ones():
    src = source({"0": {"a": np.ones((2, 2)), "b": np.ones((2, 2), np.float32), "c": np.ones((2,), np.int32),
                        "s": np.array(["x", "yy"])}})
    [[batch]] = bind(src, parse("<a=float32[?,2],s=string[?]>*"))
    assert batch.a.dtype == np.float32 and batch.s.tolist() == ["x", "yy"]
    for declared, field, found in [("<b=float64[?,2]>*", "b", "float32 examples of shape [2]"),
                                   ("<b=int32[?,2]>*", "b", "float32 examples of shape [2]"),
                                   ("<c=float32[?]>*", "c", "int32 examples of shape []"),
                                   ("<c=int64[?]>*", "c", "int32 examples of shape []"),
                                   ("<s=int32[?]>*", "s", "string examples of shape []")]:
        leaf = parse(declared).element.fields[0][1]
        assert error_of(bind, src, parse(declared)) == f"mem: client 0, field '{field}': declared {leaf}, found {found}"


def test_error_texts_name_the_client_and_the_field():
    ids = [str(i) for i in range(18)]
    per = {c: {"x": np.zeros((4, 64), np.float32), "y": np.zeros(4, np.int32)} for c in ids}
    per["17"] = {"x": np.zeros((8, 8, 8)), "y": np.zeros(8, np.int32)}
    digits = source(per, name="digits")
    assert error_of(bind, digits, BATCHES) == (
        "digits: client 17, field 'x': declared float32[?,64], found float64 examples of shape [8,8]")
    assert error_of(bind, digits, parse("<x=float32[?,64],z=int32[?]>*")) == (
        "digits: client 0, field 'z': declared int32[?], found no such feature (the client has 'x', 'y')")
    assert error_of(bind, digits, parse("<x=float32[64],y=int32>")) == (
        "digits: client 0, field 'x': declared float32[64] (one value per client), found 4 examples; declare "
        "a sequence {<x=float32[64],y=int32>*}@CLIENTS to bind all of a client's examples")
    assert error_of(bind, digits, parse("float32[?,64]*")) == (
        "digits: client 0: declared the bare tensor float32[?,64], which binds the only feature of a "
        "one-feature source, but the client has 2 features ('x', 'y'); declare a struct naming the "
        "features to bind, as in <x=...,y=...>")
    uneven = source({"a": {"x": np.zeros((5, 64), np.float32), "y": np.zeros(6, np.int32)}})
    assert error_of(bind, uneven, BATCHES) == (
        "mem: client a, field 'y': found 6 examples, but field 'x' has 5; every field needs one entry "
        "per example")
    assert error_of(bind, digits, BATCHES, clients=[18]) == (
        "digits: no client at index 18 (the source has 18 clients, indices 0..17)")
    assert error_of(bind, digits, BATCHES, batch_size=0) == (
        "digits: the batch size must be a whole number of at least 1, got 0")
    assert error_of(bind, digits, parse("<x=<a=float32>>*")).startswith(
        "digits: cannot bind data to <x=<a=float32>>*: field 'x' is <a=float32>")
    assert error_of(bind, digits, parse("float32@CLIENTS")).startswith(
        "digits: client data binds to {T}@CLIENTS parameters")


def test_binding_1000_clients_is_fast():
    rng = np.random.default_rng(0)
    big = ArraySource("big", [str(i) for i in range(1000)],
                      per_client=[{"x": rng.standard_normal((32, 64), dtype=np.float32),
                                   "y": rng.integers(0, 10, 32).astype(np.int32)} for _ in range(1000)])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        values = bind(big, BATCHES)
        best = min(best, time.perf_counter() - start)
    assert len(values) == 1000 and all(len(v) == 2 for v in values)
    assert best < 0.1, f"binding 1000 clients took {best * 1000:.0f} ms"


def test_the_documented_error_texts_are_what_binding_says(tmp_path, monkeypatch):
    """docs/data.md's "Errors" block: each line is a message these scenarios produce (a line
    ending in "..." is a prefix)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text()
    block = re.search(r"## Errors\n.*?```\n(.*?)```", doc, re.S).group(1)
    per = {str(i): {"x": np.zeros((4, 64), np.float32), "y": np.zeros(4, np.int32)} for i in range(18)}
    per["17"] = {"x": np.zeros((8, 8, 8)), "y": np.zeros(8, np.int32)}
    digits = source(per, name="digits")
    emnist, _ = emnist_file(tmp_path)
    scenarios = [
        lambda: bind(digits, BATCHES),
        lambda: bind(digits, parse("<x=float32[?,64],z=int32[?]>*")),
        lambda: bind(source({"7": {"y": np.array([3000000000])}}), parse("<y=int32[?]>*")),
        lambda: bind(digits, parse("<x=float32[64],y=int32>")),
        lambda: bind(source({"a": {"x": np.zeros((5, 64), np.float32), "y": np.zeros(6, np.int32)}}), BATCHES),
        lambda: bind(digits, parse("float32[?,64]*")),
        lambda: open_source(emnist.name),
        lambda: open_source("mnist"),
    ]
    monkeypatch.chdir(tmp_path)                             # so the file's name is its spec
    messages = [error_of(s) for s in scenarios]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == len(messages)
    for line, message in zip(lines, messages):
        if line.endswith("..."):
            assert message.startswith(line[:-3])
        else:
            assert message == line
