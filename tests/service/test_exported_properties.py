"""Property tests of the .pt2 reader (hypothesis; issue 10): arbitrary bytes, byte-mutated valid
archives and valid archives whose model.json or weights config has any value replaced or removed
never raise anything but ``ExportedProgramError`` (from read_pt2, describe_program or
read_weights); valid generated MLP archives are described and their weights read back exactly.

The archives are written by hand (tests/pt2_files.py, checked against torch's own in
test_exported_hostile.py), so no torch is needed. Seeded, no example database, no deadline.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import event, given
from hypothesis import strategies as st

from service.exported_files import ExportedProgramError, describe_program, read_pt2, read_weights
from tests.helpers.properties import FUZZ, ROUND_TRIP
from tests.helpers.pt2_files import mlp_parts, mlp_pt2, write_pt2

_PATH = Path(tempfile.mkdtemp(prefix="gradtune-pt2-properties-")) / "example.pt2"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _read_all(data: bytes) -> None:
    """read_pt2, describe_program and read_weights on ``data``: ExportedProgramError or success."""
    _PATH.write_bytes(data)
    try:
        program = read_pt2(_PATH)
        describe_program(program)
        read_weights(_PATH, program)
    except ExportedProgramError as exc:
        assert str(exc)
        event("refused")
        return
    event("accepted")


def _paths(doc, prefix=()):
    """Every (container path, key) in a JSON document."""
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return
    for k, v in items:
        yield prefix, k
        yield from _paths(v, (*prefix, k))


def _template():
    model, config, params = mlp_parts([3, 4, 2], batch=2)
    weights = {config["config"][n]["path_name"]: np.ones(shape, "<f4").tobytes() for n, shape in params}
    return model, config, weights


_MODEL, _CONFIG, _WEIGHTS = _template()
_MODEL_PATHS = list(_paths(_MODEL))
_CONFIG_PATHS = list(_paths(_CONFIG))


@st.composite
def json_mutations(draw):
    """The template archive with a few values of model.json or the weights config replaced or removed."""
    model, config = copy.deepcopy(_MODEL), copy.deepcopy(_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        in_model = draw(st.booleans())
        doc = model if in_model else config
        prefix, key = draw(st.sampled_from(_MODEL_PATHS if in_model else _CONFIG_PATHS))
        try:
            target = doc
            for k in prefix:
                target = target[k]
            if draw(st.booleans()):
                target[key] = draw(json_values)
            else:
                del target[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the container
    return write_pt2(model, config, _WEIGHTS)


@st.composite
def byte_mutations(draw):
    data = bytearray(write_pt2(_MODEL, _CONFIG, _WEIGHTS))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[max(at, 1) :]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2048) | st.binary(max_size=512).map(lambda b: b"PK\x03\x04" + b))
def test_arbitrary_bytes_raise_only_exported_program_error(data):
    _read_all(data)


@FUZZ
@given(byte_mutations())
def test_byte_mutated_archives_raise_only_exported_program_error(data):
    _read_all(data)


@FUZZ
@given(json_mutations())
def test_any_value_of_model_json_replaced_or_removed_raises_only_exported_program_error(data):
    _read_all(data)


@ROUND_TRIP
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    batch=st.integers(1, 6),
    activation=st.sampled_from(["tanh", "relu", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_valid_mlp_archives_round_trip(widths, batch, activation, seed):
    data, arrays = mlp_pt2(widths, batch=batch, seed=seed, activation=activation)
    _PATH.write_bytes(data)
    program = read_pt2(_PATH)
    summary = describe_program(program)
    layers = len(widths) - 1
    assert summary["input_shape"] == [widths[0]] and summary["output_width"] == widths[-1]
    assert summary["export_batch"] == batch
    assert summary["operators"] == (["linear", activation] * layers)[:-1]
    assert [(p["name"], p["shape"]) for p in summary["parameters"]] == [(n, list(a.shape)) for n, a in arrays.items()]
    assert summary["parameter_count"] == sum(a.size for a in arrays.values())
    assert summary["default_init"] is True
    weights = read_weights(_PATH, program)
    assert weights == {n: a.tobytes() for n, a in arrays.items()}
