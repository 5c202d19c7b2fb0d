"""The `gguf` package's reader as the oracle for our GGUF header parser."""

from __future__ import annotations

import gguf
import numpy as np


def same_as_gguf_reader(path) -> None:
    """Our header parser reads exactly what gguf.GGUFReader reads: every field, every tensor's bytes."""
    from gemma.gguf_file import read_gguf_header, tensor_array

    fields, infos, mapped = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert np.array_equal(np.float32(fields[key]), np.float32(value)), key
        else:
            assert fields[key] == value, key
    assert [t.name for t in infos] == [t.name for t in reader.tensors]
    for ours, ref in zip(infos, reader.tensors):
        assert ours.qtype == ref.tensor_type and ours.dims == tuple(int(d) for d in ref.shape), ours.name
        assert np.array_equal(tensor_array(ours, mapped), ref.data), ours.name
