"""`open_source(SPEC)`: from the text after `--data NAME=` to a client source.

  digits | digits:test        BENCHMARKS W1's split of scikit-learn's digits
  digits:test:N               its test set split over N clients (to pair with N training clients)
  sensors | sensors:N         BENCHMARKS W0's temperature readings
  FOLDER                      one CLIENT_ID.npz per client
  FILE.sqlite[.lzma][:SPLIT]  TFF SqlClientData (e.g. emnist_all.sqlite.lzma:digits_only_train)
  FILE.h5 | FILE.hdf5         TFF's legacy HDF5ClientData

Sources are cached per process; a file's entry is keyed by its size and
modification time, so a changed file is read again.
"""

from __future__ import annotations

from pathlib import Path

from fedlang.backends.data.builtins import digits_source, digits_test_source, sensors_source
from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ClientSource

BUILTINS = ("digits", "digits:test", "digits:test:N", "sensors", "sensors:N")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_SPEC_HELP = ("built-in data sets are digits, digits:test, sensors and sensors:N; anything else is a path: "
              "a folder of CLIENT_ID.npz files, a TFF .sqlite or .sqlite.lzma file (FILE:SPLIT picks a "
              "split), or a TFF .h5 file")

_cache: dict[tuple, ClientSource] = {}


def open_source(spec: str) -> ClientSource:
    """The client source `spec` names; raises DataError saying what is wrong and how to fix it."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; {_SPEC_HELP}")
    head, _, rest = spec.partition(":")
    if head == "digits":
        split, _, count = rest.partition(":")
        if split == "test" and count:
            return _cached(("digits", "test", count), lambda: digits_test_source(spec, count))
        if rest not in ("", "train", "test"):
            raise DataError(f"{spec}: digits has the splits train (the default: 100 clients) and test "
                            f"(one client \"test\"; digits:test:N splits it over N clients); write digits, "
                            f"digits:test or digits:test:N")
        return _cached(("digits", rest or "train"), lambda: digits_source(rest or "train"))
    if head == "sensors":
        return _cached(("sensors", rest), lambda: sensors_source(spec))
    path, split = _path_and_split(spec)
    try:
        stat = path.stat()
        if path.is_dir():
            if split is not None:
                raise DataError(f"{spec}: {path} is a folder of .npz files, which has no splits")
            from fedlang.backends.data.npz import NpzFolderSource
            listing = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in path.iterdir() if p.suffix == ".npz"))
            return _cached(("npz", str(path.resolve()), listing), lambda: NpzFolderSource(path, spec))
        kind = _file_kind(path, spec)
    except OSError as error:
        raise DataError(f"{spec}: cannot read {path} ({error.strerror or error})") from None
    key = (kind, str(path.resolve()), split, stat.st_size, stat.st_mtime_ns)
    if kind in ("sqlite", "sqlite.lzma"):
        from fedlang.backends.data.tff import SqliteSource, decompressed

        def make() -> ClientSource:
            database = decompressed(path, spec) if kind == "sqlite.lzma" else path
            return SqliteSource(database, split, spec)
        return _cached(key, make)
    if split is not None:
        raise DataError(f"{spec}: only TFF SQLite files have splits; {path} is an HDF5 file (TFF keeps "
                        f"each split of these in its own file)")
    from fedlang.backends.data.tff import Hdf5Source
    return _cached(key, lambda: Hdf5Source(path, spec))


def clear_cache() -> None:
    """Forget every opened source (tests; a long-lived process that wants the memory back)."""
    _cache.clear()


def _cached(key: tuple, make) -> ClientSource:
    source = _cache.get(key)
    if source is None:
        source = _cache[key] = make()
    return source


def _path_and_split(spec: str) -> tuple[Path, str | None]:
    if Path(spec).exists():
        return Path(spec), None
    left, colon, right = spec.rpartition(":")
    if colon and left and Path(left).exists():
        return Path(left), right
    looks_like_path = any(c in spec for c in "/\\.") or spec.startswith("~")
    if not looks_like_path:
        raise DataError(f"unknown data set '{spec}': {_SPEC_HELP}")
    missing = left if colon and left and not any(c in right for c in "/\\") else spec
    raise DataError(f"{spec}: no such file or folder: {missing}; check the path (relative paths start "
                    f"from the current folder)")


def _file_kind(path: Path, spec: str) -> str:
    name = path.name.lower()
    if name.endswith(".lzma") or name.endswith(".xz"):
        return "sqlite.lzma"
    if name.endswith((".sqlite", ".sqlite3", ".db")):
        return "sqlite"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if name.endswith(".npz"):
        raise DataError(f"{spec}: a single .npz file; put one CLIENT_ID.npz file per client in a folder "
                        f"and pass the folder")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(_XZ_MAGIC):
        return "sqlite.lzma"
    raise DataError(f"{spec}: cannot tell the format of {path}; {_SPEC_HELP}")
