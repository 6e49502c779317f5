"""TensorFlow Federated's on-disk client data, read without TFF.

SQLite (`tff.simulation.datasets.SqlClientData`, as `emnist_all.sqlite.lzma`):
  examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
  client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)
Each row of `examples` is one serialized `tf.train.Example` whose features are
flat lists (float_list -> float32, int64_list -> int64, bytes_list -> string);
binding reshapes them to the declared per-example shape. Clients are the
distinct `client_id`s of the split in `client_metadata`, sorted as TFF sorts
them; a client's examples come in stored (rowid) order. TensorFlow is imported
only here, and only when a row is parsed. A `.lzma` file is decompressed once
into the user's cache folder.

HDF5 (the legacy `tff.simulation.HDF5ClientData`, as `fed_emnist_digitsonly_train.h5`):
  /examples/<client_id>/<feature>   one dataset per feature, leading axis = examples.
"""

from __future__ import annotations

import hashlib
import itertools
import lzma
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

import numpy as np

from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ClientSource, check_example_axis, decode_strings

EXAMPLES_COLUMNS = ("split_name", "client_id", "serialized_example_proto")
METADATA_COLUMNS = ("client_id", "split_name")
_FETCH_CHUNK = 500                           # rowids per `IN (...)` query


# ---- .lzma: decompress once into the cache --------------------------------------------------------

def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fedlang`, else `~/.cache/fedlang`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlang"


def decompressed(path: Path, name: str) -> Path:
    """The decompressed copy of the `.lzma` file `path`, made on first use.

    The cache file is keyed by a hash of the path, size and modification time,
    so an edited or replaced archive is decompressed again; it is written to a
    temporary file and renamed, so a crash never leaves a truncated copy."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    inner = path.name[:-len(".lzma")] if path.name.endswith(".lzma") else path.name
    stem, dot, suffix = inner.rpartition(".")
    target = cache_dir() / (f"{stem}-{key}.{suffix}" if dot else f"{inner}-{key}")
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    except OSError as error:
        raise DataError(f"{name}: cannot write the decompressed copy under {target.parent} ({error}); "
                        f"set XDG_CACHE_HOME to a writable folder") from None
    try:
        with lzma.open(path) as source, os.fdopen(fd, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        os.replace(partial, target)
    except (lzma.LZMAError, EOFError) as error:
        raise DataError(f"{name}: not a readable .lzma file ({error}); download it again or pass the "
                        f"decompressed .sqlite file") from None
    except OSError as error:
        raise DataError(f"{name}: cannot decompress into {target.parent} ({error})") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


# ---- SQLite ---------------------------------------------------------------------------------------

class SqliteSource(ClientSource):
    flat = True

    def __init__(self, path: Path, split: str | None, name: str):
        super().__init__()
        self.name = name
        self.path = path
        try:
            self._db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise DataError(f"{name}: not a readable SQLite database ({error}); TFF's client data files "
                            f"are SQLite databases, possibly compressed as .sqlite.lzma") from None
        self._require(tables, "examples", EXAMPLES_COLUMNS)
        self._require(tables, "client_metadata", METADATA_COLUMNS)
        splits = sorted({r[0] for r in self._query("SELECT DISTINCT split_name FROM client_metadata")}, key=str)
        if split is None:
            if len(splits) > 1:
                raise DataError(f"{name}: the file holds several splits; name one as {name}:SPLIT, "
                                f"one of {_listing(splits)}")
            if not splits:
                raise DataError(f"{name}: the file holds no clients (client_metadata is empty)")
            split = splits[0]
        elif split not in splits:
            raise DataError(f"{name}: no split {split!r} in the file; its splits are {_listing(splits)}")
        self.split = split
        raw = sorted({r[0] for r in self._query(
            "SELECT DISTINCT client_id FROM client_metadata WHERE split_name = ?", (split,))}, key=str)
        self._raw_ids = raw                          # as stored (normally TEXT), for the queries
        self.client_ids = [str(c) for c in raw]
        self._rowids: dict[object, list[int]] | None = None
        self._indexed = self._client_index_exists()
        self._schema: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()            # one connection, shared by threads that bind

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as error:
            raise DataError(f"{self.name}: cannot read the database ({error}); the file may be damaged: "
                            f"download it again") from None

    def _require(self, tables: set[str], table: str, columns: tuple[str, ...]) -> None:
        hint = ("TFF's layout is examples(split_name, client_id, serialized_example_proto) and "
                "client_metadata(client_id, split_name, num_examples)")
        if table not in tables:
            raise DataError(f"{self.name}: no table '{table}' in the database; {hint}")
        have = {r[1] for r in self._query(f"PRAGMA table_info({table})")}
        missing = [c for c in columns if c not in have]
        if missing:
            raise DataError(f"{self.name}: table '{table}' lacks the column(s) {_listing(missing)}; {hint}")

    def _client_index_exists(self) -> bool:
        for index in self._query("PRAGMA index_list(examples)"):
            columns = [r[2] for r in self._query(f"PRAGMA index_info('{index[1]}')")]
            if columns[:1] == ["client_id"] or columns[:2] == ["split_name", "client_id"]:
                return True
        return False

    def _blobs(self, i: int) -> list[bytes]:
        """Client i's serialized examples in stored order."""
        with self._lock:
            return self._fetch(self._raw_ids[i])

    def _fetch(self, raw: object) -> list[bytes]:
        if self._indexed:
            return [r[0] for r in self._query(
                "SELECT serialized_example_proto FROM examples WHERE client_id = ? AND split_name = ? "
                "ORDER BY rowid", (raw, self.split))]
        if self._rowids is None:                # no index: find every client's rows in one scan
            rowids: dict[object, list[int]] = {}
            for client, rowid in self._query(
                    "SELECT client_id, rowid FROM examples WHERE split_name = ? ORDER BY rowid", (self.split,)):
                rowids.setdefault(client, []).append(rowid)
            self._rowids = rowids
        mine = self._rowids.get(raw, [])
        if mine and mine[-1] - mine[0] + 1 == len(mine):
            return [r[0] for r in self._query(
                "SELECT serialized_example_proto FROM examples WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                (mine[0], mine[-1]))]
        rows: list[tuple] = []
        for k in range(0, len(mine), _FETCH_CHUNK):
            chunk = mine[k:k + _FETCH_CHUNK]
            rows += self._query("SELECT rowid, serialized_example_proto FROM examples WHERE rowid IN "
                                f"({','.join('?' * len(chunk))})", tuple(chunk))
        return [blob for _, blob in sorted(rows)]

    def _load(self, i: int) -> dict[str, np.ndarray]:
        blobs = self._blobs(i)
        if not blobs:
            return dict(self._empty())
        return parse_examples(blobs, f"{self.name}: client {self.client_ids[i]}")

    def _empty(self) -> dict[str, np.ndarray]:
        """Zero-example arrays with the split's feature layout (for clients without rows)."""
        if self._schema is None:
            with self._lock:
                first = self._query("SELECT serialized_example_proto FROM examples WHERE split_name = ? LIMIT 1",
                                    (self.split,))
            parsed = parse_examples([first[0][0]], f"{self.name}: first example") if first else {}
            self._schema = {k: v[:0] for k, v in parsed.items()}
        return self._schema


def parse_examples(blobs: list[bytes], where: str) -> dict[str, np.ndarray]:
    """Serialized `tf.train.Example`s -> {feature: [n, L] array}, L the (common) list length."""
    example = _example_class()
    try:
        protos = [example.FromString(blob) for blob in blobs]
    except Exception as error:                 # protobuf's DecodeError, or a row that is not bytes
        raise DataError(f"{where}: a row is not a serialized tf.train.Example ({error})") from None
    maps = [p.features.feature for p in protos]
    names = sorted(maps[0].keys())
    extra = sorted({k for m in maps for k in m.keys()} - set(names))
    if extra:
        raise DataError(f"{where}, field '{extra[0]}': only some examples have this feature; every "
                        f"example of a client needs the same features")
    out: dict[str, np.ndarray] = {}
    n = len(protos)
    for name in names:
        if any(name not in m for m in maps):
            raise DataError(f"{where}, field '{name}': only some examples have this feature; every "
                            f"example of a client needs the same features")
        features = [m[name] for m in maps]
        kinds = {f.WhichOneof("kind") for f in features}
        if len(kinds) != 1 or None in kinds:
            raise DataError(f"{where}, field '{name}': the examples store it as "
                            f"{_listing(sorted(str(k) for k in kinds))}; one list kind is needed")
        kind = kinds.pop()
        lists = [getattr(f, kind).value for f in features]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=n)
        if (lengths != lengths[0]).any():
            other = int(lengths[np.flatnonzero(lengths != lengths[0])[0]])
            raise DataError(f"{where}, field '{name}': examples hold different numbers of values "
                            f"({int(lengths[0])} and {other}); fedlang binds fixed-size features only")
        length = int(lengths[0])
        if kind == "bytes_list":
            try:
                values = np.array([v.decode("utf-8") for v in itertools.chain.from_iterable(lists)],
                                  dtype=np.str_)
            except UnicodeDecodeError:
                raise DataError(f"{where}, field '{name}': holds bytes that are not UTF-8 text; "
                                f"fedlang's string tensors hold text") from None
        else:
            dtype = np.float32 if kind == "float_list" else np.int64
            values = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=n * length)
        out[name] = values.reshape(n, length)
    return out


def _example_class():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError("reading TFF SQLite client data needs TensorFlow, to parse tf.train.Example "
                        "rows: pip install tensorflow") from None
    return tf.train.Example


# ---- HDF5 -----------------------------------------------------------------------------------------

class Hdf5Source(ClientSource):
    def __init__(self, path: Path, name: str):
        super().__init__()
        import h5py

        self.name = name
        self.path = path
        try:
            with h5py.File(path, "r") as h5:
                group = h5.get("examples")
                if not isinstance(group, h5py.Group):
                    raise DataError(f"{name}: no group /examples in the file; TFF's HDF5 client data keeps "
                                    f"client C's feature F at /examples/C/F")
                ids = sorted(group.keys())
        except OSError as error:
            raise DataError(f"{name}: not a readable HDF5 file ({error})") from None
        if not ids:
            raise DataError(f"{name}: /examples holds no clients")
        self.client_ids = ids

    def _load(self, i: int) -> dict[str, np.ndarray]:
        import h5py

        client = self.client_ids[i]
        features: dict[str, np.ndarray] = {}
        try:
            with h5py.File(self.path, "r") as h5:
                group = h5["examples"][client]
                if not isinstance(group, h5py.Group):
                    raise DataError(f"{self.name}: client {client}: /examples/{client} is a dataset, not a "
                                    f"group of features")
                for key, item in group.items():
                    if not isinstance(item, h5py.Dataset):
                        raise DataError(f"{self.name}: client {client}, field '{key}': a group, not a "
                                        f"dataset; features are datasets /examples/{client}/FEATURE")
                    features[key] = decode_strings(item[()], f"{self.name}: client {client}, field '{key}'")
        except (OSError, KeyError) as error:
            raise DataError(f"{self.name}: client {client}: cannot read its data ({error})") from None
        check_example_axis(self.name, client, features)
        return features


def _listing(items) -> str:
    return ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items)
