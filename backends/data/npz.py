"""A folder of per-client `.npz` files: `CLIENT_ID.npz`, one array per feature.

Clients are the file stems in natural order ("2" before "10"); each file is
read on first use, never unpickling (`allow_pickle=False`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ClientSource, check_example_axis, decode_strings, natural_key


class NpzFolderSource(ClientSource):
    def __init__(self, folder: Path, name: str):
        super().__init__()
        self.name = name
        self.folder = folder
        files = [p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file()]
        if not files:
            raise DataError(f"{name}: the folder holds no .npz files; put one file per client in it, "
                            f"named CLIENT_ID.npz, with one array per feature (leading axis = examples)")
        files.sort(key=lambda p: natural_key(p.stem))
        self._files = files
        self.client_ids = [p.stem for p in files]

    def _load(self, i: int) -> dict[str, np.ndarray]:
        path, client = self._files[i], self.client_ids[i]
        try:
            with np.load(path, allow_pickle=False) as npz:
                features = {key: npz[key] for key in npz.files}
        except ValueError as error:
            if "allow_pickle" in str(error) or "pickle" in str(error).lower():
                raise DataError(f"{self.name}: client {client}: {path.name} holds Python objects, which "
                                f"fedlang never unpickles; save plain numeric or string arrays") from None
            raise DataError(f"{self.name}: client {client}: cannot read {path.name}: {error}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"{self.name}: client {client}: cannot read {path.name} "
                            f"({type(error).__name__}: {error}); is it a file written by numpy.savez?") from None
        features = {k: decode_strings(v, f"{self.name}: client {client}, field '{k}'") for k, v in features.items()}
        check_example_axis(self.name, client, features)
        return features
