"""``dints3d import-arch``: DiNTS arch files from the wild → a validated ``arch.json``.

Accepted inputs:

- torch-pickled dicts (zip or legacy torch format) of numpy arrays or tensors, with the keys of the model zoo and
  MONAI tutorials (``node_a``, ``arch_code_a``, ``arch_code_c``) or of MONAI Auto3DSeg (``node_a``, ``code_a``,
  ``code_c``); ``arch_code_c`` may be op indices (L × P) or one-hot (L × P × K);
- JSON with the same keys, or a dints3d ``arch.json`` (re-validated).

Pickles are read WITHOUT running arbitrary code: ``torch.load`` gets a pickle module whose unpickler resolves only
the globals numpy arrays, numpy scalars and plain tensors need (:data:`ALLOWED_GLOBALS`); any other global is refused
with a :class:`DintsError` naming the file and the global, before it is imported or called. TorchScript archives
(which ``torch.load`` would hand to ``torch.jit.load``) are refused too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dints3d.spaces.base import check_document
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.dints.operations import operation_names
from dints3d.utils.errors import DintsError

#: pickle global (module, name) → where to find it; numpy moved ``core`` to ``_core`` in 2.0, both spellings occur.
ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"): ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): ("torch._utils", "_rebuild_parameter"),
}
# torch resolves storage classes (``torch.FloatStorage`` …) itself before asking the unpickler.

#: key style → the file's names for (node_a, arch_code_a, arch_code_c)
KEY_STYLES: dict[str, tuple[str, str, str]] = {
    "model_zoo": ("node_a", "arch_code_a", "arch_code_c"),
    "auto3dseg": ("node_a", "code_a", "code_c"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`ALLOWED_GLOBALS`."""

    def __init__(self, module: str, name: str):
        self.qualname = f"{module}.{name}"
        super().__init__(f"refused global {self.qualname}")


def _resolve(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # numpy < 2 has no numpy._core
        return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numpy arrays/scalars and tensors; raises :class:`RefusedGlobal` for anything
    else (so ``os.system``, ``builtins.eval`` … are never imported, let alone called)."""

    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise RefusedGlobal(module, name)
        return _resolve(*target)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: what ``torch.load(pickle_module=...)`` needs of a pickle module: ``Unpickler``, ``load`` and ``__name__``.
RESTRICTED_PICKLE = types.ModuleType("dints3d_restricted_pickle")
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def safe_torch_load(data: bytes, source: str | os.PathLike) -> Any:
    """``torch.load`` of a file's bytes through :class:`RestrictedUnpickler`; tensors land on the CPU."""
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        try:
            names = zipfile.ZipFile(buffer).namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DintsError(source, f"damaged zip archive: {e}") from None
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            raise DintsError(source, "a TorchScript archive, not an arch file (refused: loading it runs its code)")
    buffer.seek(0)
    try:
        return torch.load(buffer, map_location="cpu", pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except RefusedGlobal as e:
        raise DintsError(source, f"refused to unpickle global '{e.qualname}': arch files hold only numpy arrays "
                         "or tensors (the file may be malicious)") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OSError, zipfile.BadZipFile) as e:
        raise DintsError(source, f"cannot read as a torch file (truncated or not a torch.save file): {e}") from None


def _as_array(value: Any, key: str, source: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DintsError(source, f"'{key}' is not a numeric array") from None
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise DintsError(source, f"'{key}' must hold integers (0/1 or op indices)")
    return array.astype(np.int64)


def op_indices(arch_code_c: np.ndarray, arch_code_a: np.ndarray, num_ops: int, key: str, source: str) -> np.ndarray:
    """L × P op indices from L × P indices or an L × P × K one-hot (all-zero rows allowed on inactive paths)."""
    if arch_code_c.ndim != 3:
        return arch_code_c
    if arch_code_c.shape[-1] != num_ops:
        raise DintsError(source, f"one-hot '{key}' has {arch_code_c.shape[-1]} operations, expected {num_ops}")
    counts = arch_code_c.sum(-1)
    active = arch_code_a > 0 if arch_code_a.shape == counts.shape else np.ones_like(counts, dtype=bool)
    if not np.isin(arch_code_c, (0, 1)).all() or (counts > 1).any() or (active & (counts == 0)).any():
        raise DintsError(source, f"one-hot '{key}' must have exactly one 1 per active path")
    return arch_code_c.argmax(-1)


def codes_from_mapping(data: Any, source: str, spatial_dims: int) -> tuple[dict, str]:
    """The ``node_a``/``arch_code_a``/``arch_code_c`` lists of a model-zoo or Auto3DSeg dict, and its key style."""
    if not isinstance(data, dict):
        raise DintsError(source, f"expected a dict of arrays, found {type(data).__name__}")
    for style, keys in KEY_STYLES.items():
        if all(k in data for k in keys):
            break
    else:
        expected = " or ".join("/".join(keys) for keys in KEY_STYLES.values())
        raise DintsError(source, f"keys {sorted(map(str, data))} are neither {expected}")
    node_a, code_a, code_c = (_as_array(data[k], k, source) for k in keys)
    code_c = op_indices(code_c, code_a, len(operation_names(spatial_dims)), keys[2], source)
    codes = {"node_a": node_a.tolist(), "arch_code_a": code_a.tolist(), "arch_code_c": code_c.tolist()}
    return codes, style


def import_architecture(path: str | os.PathLike, spatial_dims: int | None = None,
                        channel_mul_search: float | None = None, extra_provenance: dict | None = None
                        ) -> DintsArchitecture:
    """Read any accepted arch file; options left ``None`` keep the file's value (default 3-D, 0.5 for pickles).
    Provenance records the source file's name, its sha256 and the key style."""
    path = Path(path)
    source = os.fspath(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DintsError(source, f"cannot read: {e.strerror or e}") from None
    if not raw:
        raise DintsError(source, "empty file")
    provenance: dict[str, Any] = {"source_file": path.name, "sha256": hashlib.sha256(raw).hexdigest()}
    if raw.lstrip()[:1] == b"{":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DintsError(source, f"invalid JSON: {e}") from None
    else:
        data = safe_torch_load(raw, source)
    if isinstance(data, dict) and "space" in data:
        if data["space"] != DintsArchitecture.space:
            raise DintsError(source, f"import-arch handles DiNTS architectures, not '{data['space']}'")
        check_document(data, (DintsArchitecture.space,), source)
        arch = DintsArchitecture.from_dict(data, source)
        fields = arch.to_dict()
        provenance.update(key_style="arch.json", source_provenance=arch.provenance)
    else:
        codes, style = codes_from_mapping(data, source, spatial_dims or 3)
        fields = {"space": DintsArchitecture.space, "version": 1, "spatial_dims": 3, **codes}
        provenance["key_style"] = style
    if spatial_dims is not None:
        fields["spatial_dims"] = spatial_dims
    if channel_mul_search is not None:
        fields["channel_mul_search"] = channel_mul_search
    fields["provenance"] = {**provenance, **(extra_provenance or {})}
    return DintsArchitecture.from_dict(fields, source)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="arch file: torch-pickled dict (model zoo / Auto3DSeg keys) or JSON")
    parser.add_argument("--out", required=True, help="arch.json to write")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="record 2-D or 3-D (default: file's, else 3)")
    parser.add_argument("--channel-mul-search", type=float,
                        help="record the channel multiplier the architecture was searched with (default 0.5)")
    parser.add_argument("--provenance", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="add a provenance entry (repeatable), e.g. origin=… license=…")


def run(args: argparse.Namespace) -> int:
    arch = import_architecture(args.file, args.spatial_dims, args.channel_mul_search, dict(args.provenance))
    arch.save(args.out)
    style = arch.provenance["key_style"]
    print(f"wrote {args.out}: {arch.num_blocks} blocks x {arch.num_depths} depths, "
          f"{arch.num_active_paths}/{arch.arch_code_a.size} paths active (read {style} keys from {args.file})")
    return 0
