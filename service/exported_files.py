"""Read a ``torch.export`` archive (``.pt2``) as *data*: the standard library only, no torch, no pickle.

Why not ``torch.export.load``: it trusts the file. Measured on torch 2.13 (docs in the README):
* the sample inputs (``data/sample_inputs/model.pt``) go through ``torch.load(weights_only=True)``
  and, when that fails, **fall back to** ``torch.load(weights_only=False)``: a crafted file runs
  any code while loading (a test here plants ``os.system`` and sees it run);
* weights and constants marked ``use_pickle`` in the archive's own JSON are read with
  ``torch.load(weights_only=False)`` or ``pickle.loads``;
* symbolic shape expressions are parsed with ``sympy.sympify`` (which evaluates Python), node targets
  are resolved by ``getattr`` chains from the ``torch`` module (``"torch.os.system"`` resolves), and
  ``guards_code`` strings become Python source that ``ExportedProgram.module()`` executes.

So gradtune reads the archive itself: the zip directory (bounded), ``models/model.json`` with
``json.loads``, the weights as raw little-endian bytes described by ``model_weights_config.json``.
Everything else in the archive (sample inputs, extra files, guards code) is never read. The graph
must be static (no symbolic shapes) and use only the operators in ``OPS``, with arguments of plain
JSON kinds; parameters only (no buffers, constants or custom objects). ``read_pt2`` returns a plain
dict (``program``) that the worker's engine interprets with its own fixed table of torch functions
(worker/engine/exported.py): nothing in the file names code that runs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from service.formats.base import sentence
from service.formats.guards import ZIP_ERRORS, LimitError, check_json, read_member, zip_directory

__all__ = ["OPS", "ExportedProgramError", "describe_program", "read_pt2", "read_weights"]


class ExportedProgramError(ValueError):
    """The archive is not one gradtune can train; ``str()`` is a sentence for the user."""


# operator -> the arguments it may have (name -> allowed JSON kinds); the first is the input tensor.
_T, _I, _IS, _B, _N, _S, _F = "as_tensor", "as_int", "as_ints", "as_bool", "as_none", "as_string", "as_float"
OPS: dict[str, dict[str, tuple[str, ...]]] = {
    "torch.ops.aten.linear.default": {"input": (_T,), "weight": (_T,), "bias": (_T, _N)},
    "torch.ops.aten.conv2d.default": {
        "input": (_T,),
        "weight": (_T,),
        "bias": (_T, _N),
        "stride": (_IS,),
        "padding": (_IS,),
        "dilation": (_IS,),
        "groups": (_I,),
    },
    "torch.ops.aten.relu.default": {"self": (_T,)},
    "torch.ops.aten.tanh.default": {"self": (_T,)},
    "torch.ops.aten.sigmoid.default": {"self": (_T,)},
    "torch.ops.aten.gelu.default": {"self": (_T,), "approximate": (_S,)},
    "torch.ops.aten.max_pool2d.default": {
        "self": (_T,),
        "kernel_size": (_IS,),
        "stride": (_IS,),
        "padding": (_IS,),
        "dilation": (_IS,),
        "ceil_mode": (_B,),
    },
    "torch.ops.aten.avg_pool2d.default": {
        "self": (_T,),
        "kernel_size": (_IS,),
        "stride": (_IS,),
        "padding": (_IS,),
        "ceil_mode": (_B,),
        "count_include_pad": (_B,),
        "divisor_override": (_N,),
    },
    "torch.ops.aten.flatten.using_ints": {"self": (_T,), "start_dim": (_I,), "end_dim": (_I,)},
}
# torch._export.serde.schema.ScalarType / Layout
_DTYPES = {7: ("float32", 4), 8: ("float64", 8)}
_STRIDED = 7
_SCHEMA_MAJOR = 8
MAX_ENTRIES = 4096
MAX_JSON_BYTES = 16 * 1024 * 1024  # models/model.json and the configs, once unpacked (a 60-node MLP: 84 KB)
_REQUIRED = object()


def _fail(msg: str) -> ExportedProgramError:
    return ExportedProgramError(msg)


def _kind_word(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(kind, kind.__name__)


def _get(obj: Any, key: str, kind: type, what: str, default: Any = _REQUIRED) -> Any:
    """``obj[key]`` checked to be a ``kind`` (``default`` when absent, null or empty, if given);
    ExportedProgramError naming ``what`` (the object) when ``obj`` is not an object, or the value
    is missing or of another kind."""
    if not isinstance(obj, dict):
        raise _fail(f"{what} is not an object")
    value = obj.get(key)
    if value is None or (default is not _REQUIRED and not value):
        if default is _REQUIRED:
            raise _fail(f"{what} has no {key!r}")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(f"{what}: {key!r} is not {_kind_word(kind)}")
    return value


def _ints(values: Any, what: str) -> list[int]:
    """A static shape (or strides): a list of ``{"as_int": n}`` with n >= 0."""
    if values is None:
        return []
    if not isinstance(values, list):
        raise _fail(f"{what} is not a list")
    out = []
    for v in values:
        if not isinstance(v, dict) or set(v) != {"as_int"} or type(v["as_int"]) is not int:
            raise _fail(f"{what} is symbolic (a dynamic shape); export the model with static shapes")
        if v["as_int"] < 0:
            raise _fail(f"{what} has a negative size ({v['as_int']}): the archive is corrupt")
        out.append(v["as_int"])
    return out


def _check_names(infos: list[zipfile.ZipInfo], max_bytes: int) -> str:
    """The archive's one top-level folder, after checking entry names and the unpacked size."""
    total = 0
    prefixes = set()
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise _fail(f"the archive has an entry with an unsafe name: {name!r}")
        total += info.file_size
        prefixes.add(name.split("/", 1)[0])
    if total > max_bytes:
        raise _fail(f"the archive unpacks to {total} bytes, above the limit of {max_bytes}")
    if len(prefixes) != 1:
        raise _fail("a .pt2 archive has one top-level folder")
    return prefixes.pop()


def _member(zf: zipfile.ZipFile, name: str, cap: int) -> bytes:
    """Member ``name`` (KeyError when absent), read in chunks: refused past ``cap`` bytes or corrupt."""
    short = name.split("/", 1)[-1]
    try:
        return read_member(zf, name, cap, short)
    except KeyError:
        raise
    except LimitError as exc:
        raise _fail(str(exc)) from None
    except ZIP_ERRORS as exc:
        raise _fail(f"{short} is corrupt in the archive ({sentence(exc)})") from None


def _open(path: Path, max_bytes: int) -> tuple[zipfile.ZipFile, str]:
    try:
        zip_directory(path, MAX_ENTRIES)  # before ZipFile() builds a record per entry
        zf = zipfile.ZipFile(path)
    except LimitError as exc:
        raise _fail(str(exc)) from None
    except ZIP_ERRORS as exc:
        raise _fail(f"not a .pt2 archive (a zip file written by torch.export.save): {exc}") from None
    try:
        prefix = _check_names(zf.infolist(), max_bytes)
        names = set(zf.namelist())
        if f"{prefix}/archive_format" not in names or _member(zf, f"{prefix}/archive_format", 64).strip() != b"pt2":
            raise _fail("not a torch.export archive (archive_format is not pt2)")
        if f"{prefix}/byteorder" in names and _member(zf, f"{prefix}/byteorder", 64).strip() != b"little":
            raise _fail("the archive's tensors are big-endian; only little-endian archives are read")
        models = sorted(n for n in names if n.startswith(f"{prefix}/models/") and n.endswith(".json"))
        if models != [f"{prefix}/models/model.json"]:
            raise _fail("the archive must hold exactly one program, saved as torch.export.save(program, file)")
    except BaseException:
        zf.close()
        raise
    return zf, prefix


def _json(zf: zipfile.ZipFile, name: str) -> Any:
    """A JSON member, its size and nesting bounded before it is parsed."""
    short = name.split("/", 1)[1]
    try:
        raw = _member(zf, name, MAX_JSON_BYTES)
    except KeyError:
        raise _fail(f"the archive has no {short}") from None
    try:
        check_json(raw, short)
        return json.loads(raw)
    except LimitError as exc:
        raise _fail(str(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"{short} is not valid JSON: {exc}") from None


def _load(path: Path, max_bytes: int) -> tuple[Any, Any, dict[str, int], str]:
    """(model.json, the weights config, entry sizes, the archive's folder) of a checked archive."""
    zf, prefix = _open(path, max_bytes)
    with zf:
        model = _json(zf, f"{prefix}/models/model.json")
        weights_name = f"{prefix}/data/weights/model_weights_config.json"
        weights_cfg = _get(_json(zf, weights_name), "config", dict, "model_weights_config.json", {})
        names = set(zf.namelist())
        consts_name = f"{prefix}/data/constants/model_constants_config.json"
        if consts_name in names and _get(_json(zf, consts_name), "config", dict, "model_constants_config.json", {}):
            raise _fail(
                "the program has constant tensors or objects; gradtune trains programs whose state is parameters only"
            )
        sizes = {i.filename: i.file_size for i in zf.infolist()}
    return model, weights_cfg, sizes, prefix


def _graph(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(graph, signature) of a static exported program."""
    if not isinstance(model, dict) or not isinstance(model.get("schema_version"), dict):
        raise _fail("models/model.json is not an exported program")
    if model["schema_version"].get("major") != _SCHEMA_MAJOR:
        raise _fail(f"export schema version {model['schema_version']} is not supported (major {_SCHEMA_MAJOR} is)")
    if model.get("range_constraints") or model.get("guards_code"):
        raise _fail("the program has dynamic shapes; export the model with static shapes (no dynamic_shapes)")
    module = _get(model, "graph_module", dict, "models/model.json")
    graph = _get(module, "graph", dict, "the graph module", {})
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values"):
        if graph.get(key):
            raise _fail("the program has symbolic shapes; export the model with static shapes")
    if graph.get("custom_obj_values"):
        raise _fail("the program holds custom objects; gradtune trains tensors only")
    return graph, _get(module, "signature", dict, "the graph module", {})


def _tensor_name(arg: Any, what: str) -> str:
    """The name of an argument ``{"as_tensor": {"name": ...}}`` (or ``{"name": ...}`` when ``arg`` is the inner one)."""
    inner = arg.get("as_tensor", arg) if isinstance(arg, dict) else arg
    return _get(inner, "name", str, what)


def _inputs(signature: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """(parameters as {name, arg}, user input names) of the signature's input specs."""
    params: list[dict[str, Any]] = []
    user_inputs: list[str] = []
    for i, spec in enumerate(_get(signature, "input_specs", list, "the signature", [])):
        ((kind, body),) = spec.items() if isinstance(spec, dict) and len(spec) == 1 else ((None, None),)
        what = f"input spec {i} ({kind})"
        if kind == "parameter":
            params.append(
                {
                    "name": _get(body, "parameter_name", str, what),
                    "arg": _tensor_name(_get(body, "arg", dict, what), f"{what}'s argument"),
                }
            )
        elif kind == "user_input" and isinstance(body, dict) and set(body.get("arg") or {}) == {"as_tensor"}:
            user_inputs.append(_tensor_name(body["arg"], f"{what}'s argument"))
        else:
            raise _fail(
                f"the program has a {kind if isinstance(kind, str) else 'malformed'} input; gradtune trains "
                "programs with one input tensor and parameters (no buffers, constants or non-tensor inputs)"
            )
    return params, user_inputs


def _signature(signature: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
    """(parameters, the input's name, the output's name): one tensor in, one out, some parameters."""
    params, user_inputs = _inputs(signature)
    outputs = _get(signature, "output_specs", list, "the signature", [])
    if len(user_inputs) != 1:
        raise _fail(f"the program takes {len(user_inputs)} inputs; it must take one tensor (the batch)")
    spec = outputs[0] if len(outputs) == 1 and isinstance(outputs[0], dict) else {}
    body = spec.get("user_output") if set(spec) == {"user_output"} else None
    if not isinstance(body, dict) or set(body.get("arg") or {}) != {"as_tensor"}:
        raise _fail("the program must return one tensor (and no mutated buffers or extra outputs)")
    if not params:
        raise _fail("the program has no parameters to train")
    return params, user_inputs[0], _tensor_name(body["arg"], "the output spec's argument")


def _contiguous_strides(shape: list[int]) -> tuple[list[int], int]:
    """(the strides of a contiguous tensor of ``shape``, its number of values)."""
    want, acc = [], 1
    for s in reversed(shape):
        want.append(acc)
        acc *= s
    return list(reversed(want)), acc


def _check_param(p: dict[str, Any], cfg: Any, sizes: dict[str, int], prefix: str) -> None:
    """Add dtype, shape and file to parameter ``p`` after checking its stored weight ``cfg``."""
    if not isinstance(cfg, dict):
        raise _fail(f"parameter {p['name']!r} has no stored weight")
    if cfg.get("use_pickle") is not False:
        raise _fail(
            f"parameter {p['name']!r} is stored with pickle (a tensor subclass); refused: gradtune "
            "never unpickles uploaded files"
        )
    meta = _get(cfg, "tensor_meta", dict, f"parameter {p['name']!r}'s stored weight", {})
    code = meta.get("dtype")
    if type(code) is not int or code not in _DTYPES:
        raise _fail(f"parameter {p['name']!r} has dtype code {code}; only float32 and float64 are trained")
    if meta.get("layout") != _STRIDED:
        raise _fail(f"parameter {p['name']!r} is not a dense (strided) tensor")
    shape = _ints(meta.get("sizes"), f"parameter {p['name']!r}'s shape")
    strides = _ints(meta.get("strides"), f"parameter {p['name']!r}'s strides")
    want, count = _contiguous_strides(shape)
    if strides != want or _ints([meta.get("storage_offset")], "offset") != [0]:
        raise _fail(f"parameter {p['name']!r} is not stored contiguously")
    dtype, item = _DTYPES[code]
    file = f"{prefix}/data/weights/{cfg.get('path_name')}"
    if sizes.get(file) != count * item:
        raise _fail(f"parameter {p['name']!r}: the stored bytes do not match its shape {shape} and dtype {dtype}")
    p.update(dtype=dtype, shape=shape, file=file)


def _argument(where: str, a: Any, allowed: dict[str, tuple[str, ...]], defined: set[str]) -> tuple[str, Any]:
    """(name, value) of one node argument; ``where`` names the node ("node 3 (target)")."""
    name = _get(a, "name", str, f"{where}: an argument")
    arg = _get(a, "arg", dict, f"{where}: argument {name!r}", {})
    if name not in allowed or len(arg) != 1 or next(iter(arg)) not in allowed[name]:
        raise _fail(f"{where} has an unsupported argument {name!r} ({list(arg)})")
    kind, v = next(iter(arg.items()))
    if kind == _T:
        tensor = _tensor_name(v, f"{where}: argument {name!r}")
        if tensor not in defined:
            raise _fail(f"{where} uses {tensor!r} before it is defined")
        v = {"tensor": tensor}
    elif kind == _IS and not (isinstance(v, list) and all(isinstance(x, int) for x in v)):
        raise _fail(f"{where}: argument {name!r} must be a list of integers")
    elif kind == _I and not isinstance(v, int):
        raise _fail(f"{where}: argument {name!r} must be an integer")
    elif kind == _B and not isinstance(v, bool):
        raise _fail(f"{where}: argument {name!r} must be true or false")
    elif kind == _S and v not in ("none", "tanh"):
        raise _fail(f"{where}: argument {name!r} is {v!r}")
    elif kind == _N:
        v = None
    return name, v


def _shape_of(values: dict[str, Any], name: str, what: str) -> list[int] | None:
    """The static shape ``tensor_values`` records for tensor ``name``, or None when it records none."""
    meta = values.get(name)
    if not meta:
        return None
    if not isinstance(meta, dict):
        raise _fail(f"{what}: its tensor_values entry is not an object")
    return _ints(meta.get("sizes"), what)


def _node(i: int, node: Any, defined: set[str], values: dict[str, Any]) -> dict[str, Any]:
    """The checked ``i``-th node as an op; its output joins ``defined``."""
    target = node.get("target") if isinstance(node, dict) else None
    allowed = OPS.get(target) if isinstance(target, str) else None
    if target is None or allowed is None:
        short = str(target).replace("torch.ops.aten.", "")
        raise _fail(
            f"node {i} calls {short!r}, which gradtune cannot train through; supported: "
            + ", ".join(sorted(t.replace("torch.ops.aten.", "").split(".")[0] for t in OPS))
        )
    args: dict[str, Any] = {}
    for a in _get(node, "inputs", list, f"node {i} ({target})", []):
        name, v = _argument(f"node {i} ({target})", a, allowed, defined)
        args[name] = v
    first = next(iter(allowed))
    if first not in args:
        raise _fail(f"node {i} ({target}) has no input tensor")
    outs = _get(node, "outputs", list, f"node {i} ({target})", [])
    if len(outs) != 1 or not isinstance(outs[0], dict) or set(outs[0]) != {_T}:
        raise _fail(f"node {i} ({target}) must produce one tensor")
    out = _tensor_name(outs[0], f"node {i} ({target})'s output")
    defined.add(out)
    return {
        "target": target,
        "short": target.split(".")[3],
        "args": args,
        "out": out,
        "shape": _shape_of(values, out, f"node {i}'s output shape"),
    }


def read_pt2(path: str | Path, max_bytes: int = 1 << 31) -> dict[str, Any]:
    """The program of a ``.pt2`` archive as plain data, or ExportedProgramError with the reason.

    Returns ``{"input": name, "output": name, "params": [{"name", "arg", "dtype", "shape",
    "file"}], "ops": [{"target", "short", "args": {name: value}, "out"}], "input_shape": [...] }``
    where an argument value is ``{"tensor": name}``, an int, a list of ints, a bool, a string or None.
    Every malformed archive (a member missing, corrupt or too large, JSON of the wrong shape or
    nested too deep) is an ExportedProgramError naming what is wrong.
    """
    model, weights_cfg, sizes, prefix = _load(Path(path), max_bytes)
    graph, signature = _graph(model)
    params, user_input, output = _signature(signature)
    values = _get(graph, "tensor_values", dict, "the graph", {})
    for p in params:
        _check_param(p, weights_cfg.get(p["name"]), sizes, prefix)
    defined = {p["arg"] for p in params} | {user_input}
    ops = [_node(i, node, defined, values) for i, node in enumerate(_get(graph, "nodes", list, "the graph", []))]
    if output not in defined:
        raise _fail("the program's output is not computed by its graph")
    return {
        "input": user_input,
        "output": output,
        "params": params,
        "ops": ops,
        "input_shape": _shape_of(values, user_input, "the input's shape"),
        "output_shape": _shape_of(values, output, "the output's shape"),
    }


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def describe_program(program: dict[str, Any]) -> dict[str, Any]:
    """What the API stores and shows about an uploaded program (read_pt2's ``program``), or
    ExportedProgramError when it cannot be trained as a model of examples -> (rows, outputs).

    ``input_shape``: one example's shape (the exported batch dimension dropped); ``output_width``;
    ``nodes``: each operator in call order with its output shape per example and the parameters it
    uses; ``parameters``: name, shape and dtype in call order (the order the graph first uses them);
    ``parameter_count``; ``activations_per_example`` (the input plus every node's output, for memory
    estimates); ``default_init``: whether every parameter is the weight or bias of exactly one
    linear/conv2d node, so PyTorch's default initialization can be re-drawn (``init: default``).
    """
    in_shape, out_shape = program.get("input_shape"), program.get("output_shape")
    if not in_shape or len(in_shape) < 2:
        raise _fail("the program's input must be a batch (rows, ...) of at least 2 dimensions with a static shape")
    batch = in_shape[0]
    if batch < 1:
        raise _fail("the program was exported with an empty batch; export it with at least one example")
    if not out_shape or len(out_shape) != 2 or out_shape[0] != batch:
        raise _fail(
            f"the program returns shape {out_shape}; it must return (rows, outputs) for a batch of "
            f"{batch} rows (class scores or regression targets)"
        )
    by_arg = {p["arg"]: p for p in program["params"]}
    order: list[str] = []
    uses: dict[str, list[tuple[str, str]]] = {}
    nodes = []
    activations = _prod(in_shape[1:])
    for op in program["ops"]:
        used = []
        for arg_name, value in op["args"].items():
            if isinstance(value, dict) and value.get("tensor") in by_arg:
                name = by_arg[value["tensor"]]["name"]
                used.append(name)
                uses.setdefault(name, []).append((op["short"], arg_name))
                if name not in order:
                    order.append(name)
        shape = op.get("shape")
        per_example = shape[1:] if shape and shape[0] == batch else None
        if shape:
            activations += _prod(shape) // batch if shape[0] != batch else _prod(shape[1:])
        nodes.append({"op": op["short"], "output_shape": per_example, "parameters": used})
    unused = [p["name"] for p in program["params"] if p["name"] not in uses]
    if unused:
        raise _fail(f"parameter {unused[0]!r} is not used by the program's graph")
    params = {p["name"]: p for p in program["params"]}
    default_init = all(
        len(u) == 1 and u[0][0] in ("linear", "conv2d") and u[0][1] in ("weight", "bias") for u in uses.values()
    )
    return {
        "input_shape": list(in_shape[1:]),
        "output_width": out_shape[1],
        "export_batch": batch,
        "operators": [op["short"] for op in program["ops"]],
        "nodes": nodes,
        "parameters": [{"name": n, "shape": params[n]["shape"], "dtype": params[n]["dtype"]} for n in order],
        "parameter_count": sum(_prod(params[n]["shape"]) for n in order),
        "activations_per_example": activations,
        "default_init": default_init,
    }


def read_weights(path: str | Path, program: dict[str, Any]) -> dict[str, bytes]:
    """The raw bytes of every parameter of ``program`` (as read_pt2 checked them), each read in
    chunks up to the size its shape and dtype need; ExportedProgramError for a corrupt member."""
    item = {name: size for name, size in _DTYPES.values()}
    try:
        with zipfile.ZipFile(path) as zf:
            return {p["name"]: _member(zf, p["file"], _prod(p["shape"]) * item[p["dtype"]]) for p in program["params"]}
    except KeyError as exc:
        raise _fail(f"the archive has no {exc.args[0]}") from None
    except ExportedProgramError:
        raise
    except ZIP_ERRORS as exc:
        raise _fail(f"not a .pt2 archive (a zip file written by torch.export.save): {exc}") from None
