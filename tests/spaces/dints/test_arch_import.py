"""``dints3d import-arch``: torch-pickled arch files in both key styles, JSON, refusal of foreign pickles, and files
byte-for-byte in the formats real arch files come in (written here, not copied: numpy 1 pickle names, pickle
protocol 2, the model zoo's torch zip archive and Auto3DSeg's legacy torch serialization)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import struct
import types
import zipfile

import numpy as np
import pytest
import torch

from dints3d.cli import main
from dints3d.spaces.dints.arch_import import import_architecture
from dints3d.spaces.factory import PRESET_DIR, load_architecture
from dints3d.utils.errors import DintsError


@pytest.fixture(scope="module")
def cvpr():
    return load_architecture("dints-cvpr")


def model_zoo_dict(arch) -> dict:
    """As the DiNTS authors save it: node_a int64, arch_code_a float64, arch_code_c int64."""
    return {"node_a": arch.node_a.astype(np.int64), "arch_code_a": arch.arch_code_a.astype(np.float64),
            "arch_code_c": arch.arch_code_c.astype(np.int64)}


def same_codes(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("node_a", "arch_code_a", "arch_code_c"))


class RunsShell:
    """An object whose unpickling would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


#: the globals of the model zoo's arch_code_cvpr.pth and of Auto3DSeg's arch files, written under numpy 1
LEGACY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("_codecs", "encode")}


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) of every GLOBAL opcode in ``data``, one pickle or several in a row."""
    stream, found = io.BytesIO(data), set()
    while stream.tell() < len(data):
        found |= {tuple(arg.split(" ")) for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL"}
    return found


def rename_globals(data: bytes, modules: dict[str, str]) -> bytes:
    """``data`` (one pickle or several in a row, as torch's legacy format) with the module of each GLOBAL opcode
    renamed by ``modules``. Protocol-2 GLOBALs are text lines and the memo is indexed, not addressed, so an opcode
    can change length."""
    stream, out, copied = io.BytesIO(data), bytearray(), 0
    while stream.tell() < len(data):
        for op, arg, pos in pickletools.genops(stream):
            if op.name != "GLOBAL":
                continue
            module, name = arg.split(" ")
            if module in modules:
                out += data[copied:pos] + f"c{modules[module]}\n{name}\n".encode()
                copied = pos + len(f"c{module}\n{name}\n")
    return bytes(out + data[copied:])


def as_numpy1_pickle(obj) -> bytes:
    """``obj`` pickled as numpy 1 and torch's default protocol 2 write it: ``numpy.core.multiarray._reconstruct``
    (numpy 2 writes ``numpy._core``), bytes as ``_codecs.encode``; ``os.system`` under its portable name."""
    return rename_globals(pickle.dumps(obj, protocol=2),
                          {"numpy._core.multiarray": "numpy.core.multiarray", "posix": "os", "nt": "os"})


def write_torch_zip(path, data_pkl: bytes) -> None:
    """The model zoo's container: a zip of ``archive/data.pkl`` and ``archive/version`` ("3"), stored, each record
    padded to a 64-byte boundary with an ``FB`` extra field, as torch's writer does."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in (("archive/data.pkl", data_pkl), ("archive/version", b"3\n")):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            padding = -(archive.fp.tell() + 30 + len(name) + 4) % 64
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            archive.writestr(info, payload)


class OlderNumpyPickler(pickle.Pickler):
    """Pickles dtypes as older numpy releases did, ``dtype('i8', 0, 1)`` (today: ``dtype('i8', False, True)``), as
    in Auto3DSeg's arch file."""

    def reducer_override(self, obj):
        if not isinstance(obj, np.dtype):
            return NotImplemented
        constructor, (name, align, copy), *state = obj.__reduce__()
        return (constructor, (name, int(align), int(copy)), *state)


def write_torch_legacy(path, obj) -> None:
    """Auto3DSeg's container: torch's legacy (non-zip) serialization (magic number, protocol, system info, the
    object, storage keys: five protocol-2 pickles in a row), with the numpy 1 names and dtype arguments."""
    buffer = io.BytesIO()
    older_numpy = types.SimpleNamespace(Pickler=OlderNumpyPickler, dump=pickle.dump, __name__="pickle")
    torch.save(obj, buffer, pickle_module=older_numpy, _use_new_zipfile_serialization=False)
    path.write_bytes(rename_globals(buffer.getvalue(), {"numpy._core.multiarray": "numpy.core.multiarray",
                                                        "posix": "os", "nt": "os"}))


def auto3dseg_dict(arch) -> dict:
    return {"node_a": arch.node_a.astype(np.int64), "code_a": arch.arch_code_a.astype(np.float64),
            "code_c": arch.arch_code_c.astype(np.int64)}


def test_preset_is_the_published_cvpr_architecture(cvpr):
    assert (cvpr.num_blocks, cvpr.num_depths, cvpr.num_active_paths) == (12, 4, 97)
    assert cvpr.node_a[0].tolist() == [1, 1, 1, 0] and cvpr.node_a[12].tolist() == [1, 0, 1, 1]
    assert "arch_code_cvpr.pth" in cvpr.provenance["origin"] and cvpr.provenance["license"] == "Apache-2.0"
    assert cvpr.provenance["key_style"] == "model_zoo" and len(cvpr.provenance["sha256"]) == 64


def test_model_zoo_zip_file(tmp_path, cvpr):
    path = tmp_path / "arch_code.pth"
    torch.save(model_zoo_dict(cvpr), path)
    arch = import_architecture(path)
    assert same_codes(arch, cvpr)
    assert arch.provenance == {"source_file": "arch_code.pth", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "key_style": "model_zoo"}
    assert (arch.spatial_dims, arch.channel_mul_search) == (3, 0.5)


def test_auto3dseg_legacy_file_with_one_hot_ops(tmp_path, cvpr):
    one_hot = np.eye(5, dtype=np.int64)[cvpr.arch_code_c]  # (12, 10, 5)
    path = tmp_path / "arch_code.pth"
    torch.save({"node_a": cvpr.node_a, "code_a": cvpr.arch_code_a.astype(np.float64), "code_c": one_hot}, path,
               _use_new_zipfile_serialization=False)
    arch = import_architecture(path, channel_mul_search=1.0)
    assert same_codes(arch, cvpr)
    assert arch.provenance["key_style"] == "auto3dseg" and arch.channel_mul_search == 1.0


def test_tensors_and_json_inputs(tmp_path, cvpr):
    tensors = tmp_path / "tensors.pt"
    torch.save({k: torch.as_tensor(v) for k, v in model_zoo_dict(cvpr).items()}, tensors)
    assert same_codes(import_architecture(tensors), cvpr)
    plain = tmp_path / "codes.json"
    plain.write_text(json.dumps({"node_a": cvpr.node_a.tolist(), "code_a": cvpr.arch_code_a.tolist(),
                                 "code_c": cvpr.arch_code_c.tolist()}))
    assert same_codes(import_architecture(plain), cvpr)
    again = import_architecture(PRESET_DIR / "dints-cvpr.json")
    assert same_codes(again, cvpr) and again.provenance["key_style"] == "arch.json"
    assert again.provenance["source_provenance"]["license"] == "Apache-2.0"


def test_cli_writes_loadable_arch_json(tmp_path, cvpr, capsys):
    src, out = tmp_path / "arch_code.pth", tmp_path / "out" / "arch.json"
    torch.save(model_zoo_dict(cvpr), src)
    code = main(["import-arch", str(src), "--out", str(out), "--channel-mul-search", "0.25", "--spatial-dims", "3",
                 "--provenance", "origin=test"])
    assert code == 0 and "97/120 paths active" in capsys.readouterr().out
    arch = load_architecture(out)
    assert same_codes(arch, cvpr) and arch.channel_mul_search == 0.25 and arch.provenance["origin"] == "test"


@pytest.mark.parametrize("as_torch_file", [True, False])
def test_malicious_pickle_is_refused_without_running(tmp_path, capsys, as_torch_file):
    marker = tmp_path / "pwned"
    payload = {"node_a": np.ones((13, 4)), "arch_code_a": RunsShell(f"touch {marker}"), "arch_code_c": 0}
    path = tmp_path / "evil.pth"
    if as_torch_file:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert main(["import-arch", str(path), "--out", str(tmp_path / "arch.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: refused to unpickle global '") and ".system'" in err
    assert not marker.exists() and not (tmp_path / "arch.json").exists()


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(DintsError, match="TorchScript"):
        import_architecture(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_files(tmp_path, cvpr, legacy):
    path = tmp_path / "arch_code.pth"
    torch.save(model_zoo_dict(cvpr), path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DintsError) as err:
        import_architecture(path)
    assert err.value.where == str(path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(DintsError, match="empty file"):
        import_architecture(empty)


def test_wrong_shapes_and_keys(tmp_path, cvpr):
    def attempt(data: dict, match: str):
        path = tmp_path / "bad.pth"
        torch.save(data, path)
        with pytest.raises(DintsError, match=match) as err:
            import_architecture(path)
        assert err.value.where == str(path)

    good = model_zoo_dict(cvpr)
    attempt({**good, "arch_code_a": good["arch_code_a"][:, :9]}, "'arch_code_a' must be 12×10")
    attempt({**good, "node_a": good["node_a"][:12]}, "'node_a' must be 13×4")
    attempt({**good, "arch_code_c": np.eye(2, dtype=np.int64)[good["arch_code_c"] % 2]}, "has 2 operations")
    attempt({**good, "arch_code_c": np.full((12, 10, 5), 1)}, "exactly one 1")
    attempt({**good, "arch_code_a": good["arch_code_a"] * 0.5}, "must hold integers")
    disconnected = good["arch_code_a"].copy()
    disconnected[5] = 0
    disconnected[5, 0] = 1
    attempt({**good, "arch_code_a": disconnected}, "disconnected topology")
    attempt({"node_a": good["node_a"], "weights": good["arch_code_a"]}, "are neither")
    attempt([good["arch_code_a"], good["arch_code_c"]], "expected a dict")


@pytest.mark.parametrize("container", ["model_zoo_zip", "auto3dseg_legacy"])
def test_arch_files_as_written_in_the_wild_give_the_cvpr_preset(tmp_path, cvpr, capsys, container):
    """numpy-1 global names, pickle protocol 2, in the zip archive of arch_code_cvpr.pth or the legacy format of
    Auto3DSeg's auto3dseg_arch_code.pth."""
    path = tmp_path / f"{container}.pth"
    if container == "model_zoo_zip":
        data_pkl = as_numpy1_pickle(model_zoo_dict(cvpr))
        write_torch_zip(path, data_pkl)
        archive = zipfile.ZipFile(path)
        assert archive.namelist() == ["archive/data.pkl", "archive/version"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        assert all((i.header_offset + 30 + len(i.filename) + len(i.extra)) % 64 == 0 for i in archive.infolist())
        written, style = data_pkl, "model_zoo"
    else:
        write_torch_legacy(path, auto3dseg_dict(cvpr))
        written, style = path.read_bytes(), "auto3dseg"
        assert not zipfile.is_zipfile(path)
    assert written[:2] == b"\x80\x02" and pickle_globals(written) == LEGACY_GLOBALS

    out = tmp_path / "arch.json"
    assert main(["import-arch", str(path), "--out", str(out)]) == 0
    assert f"read {style} keys" in capsys.readouterr().out
    arch = load_architecture(out)
    assert same_codes(arch, cvpr) and arch.provenance["key_style"] == style
    expected = {k: v for k, v in cvpr.to_dict().items() if k != "provenance"}
    assert {k: v for k, v in arch.to_dict().items() if k != "provenance"} == expected


@pytest.mark.parametrize("container", ["model_zoo_zip", "auto3dseg_legacy"])
def test_forbidden_global_in_either_container_is_refused_in_one_line(tmp_path, capsys, container):
    marker = tmp_path / "pwned"
    payload = {"node_a": np.ones((13, 4)), "arch_code_a": RunsShell(f"touch {marker}"), "arch_code_c": 0}
    path = tmp_path / "evil.pth"
    if container == "model_zoo_zip":
        write_torch_zip(path, as_numpy1_pickle(payload))
    else:
        write_torch_legacy(path, payload)
    assert ("os", "system") in pickle_globals(path.read_bytes() if container != "model_zoo_zip"
                                              else zipfile.ZipFile(path).read("archive/data.pkl"))
    assert main(["import-arch", str(path), "--out", str(tmp_path / "arch.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert captured.err.startswith(f"error: {path}: refused to unpickle global 'os.system': ")
    assert not marker.exists() and not (tmp_path / "arch.json").exists()
