"""Client data for `fedlang run --data NAME=SPEC` (docs/data.md).

    source = open_source("digits")                      # or sensors:N, a folder, a TFF file
    values = bind(source, parse("<x=float32[?,64],y=int32[?]>*"), batch_size=16)

`open_source` reads a spec into a `ClientSource` (client ids, and each client's
examples as one array per feature); `bind` checks and converts those arrays
into interpreter values of a `{T}@CLIENTS` parameter's member type, one per
client. Every problem is a `DataError` whose message names the source, the
client and the field, and says how to fix it.

Modules: errors (DataError), sources (the interface, in-memory arrays),
builtins (digits, sensors), npz (folders of .npz), tff (TFF's SQLite and HDF5
files), specs (open_source), binding (bind).
"""

from fedlang.backends.data.binding import DEFAULT_BATCH_SIZE, BoundClients, bind
from fedlang.backends.data.builtins import DigitsW1, digits_w1, sensor_readings
from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ArraySource, ClientSource
from fedlang.backends.data.specs import clear_cache, open_source

__all__ = ["DEFAULT_BATCH_SIZE", "ArraySource", "BoundClients", "ClientSource", "DataError", "DigitsW1", "bind", "clear_cache",
           "digits_w1", "open_source", "sensor_readings"]
