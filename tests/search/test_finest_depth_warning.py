"""The search warns when the memory budget left the finest searched depth without a cell."""

import numpy as np

from dints3d.search.run import finest_depth_warning
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.dints.topology import DintsTopology
from dints3d.spaces.factory import load_architecture


def chain_at(depths: list[int], num_depths: int = 3, blocks: int = 2) -> DintsArchitecture:
    """A connected network whose every layer keeps the same-depth path of each depth in ``depths`` (op 1)."""
    topo = DintsTopology(num_depths)
    path_in, path_out = topo.path_in.numpy(), topo.path_out.numpy()
    node_a = np.zeros((blocks + 1, num_depths), dtype=np.int64)
    node_a[:, depths] = 1
    same = [p for p in range(topo.num_paths) if path_in[p] == path_out[p] and path_in[p] in depths]
    code_a = np.zeros((blocks, topo.num_paths), dtype=np.int64)
    code_a[:, same] = 1
    return DintsArchitecture(node_a=node_a, arch_code_a=code_a, arch_code_c=code_a.copy(),
                             provenance={"ram_cost_factor": 0.4})


def test_a_network_without_cells_at_depth_0_is_warned_about_with_its_budget(tmp_path):
    coarse = load_architecture(chain_at([2]).save(tmp_path / "arch.json"))  # checked connected on load
    assert coarse.unused_depths() == [0, 1]
    warning = finest_depth_warning(coarse)
    assert warning.startswith("warning: the decoded network uses no cell at depth 0")
    assert "unused depths: 0, 1" in warning and "σ = 0.4" in warning and "search.ram_cost_factor" in warning


def test_no_warning_while_depth_0_has_cells_or_for_other_spaces():
    assert chain_at([0, 2]).unused_depths() == [1]
    assert finest_depth_warning(chain_at([0, 2])) is None
    assert finest_depth_warning(chain_at([0, 1, 2])) is None
    assert finest_depth_warning(load_architecture("segresnet", {"patch_size": [32, 32, 32], "name": "t"})) is None
