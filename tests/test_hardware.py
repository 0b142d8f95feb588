"""Hardware profiles: catalogue data, name matching, overrides and one-line errors."""

from __future__ import annotations

import pytest

from planner.errors import ChunkftError
from planner.hardware import GpuProfile, Hardware, hardware, host_defaults, list_gpus, load_gpu

REQUIRED = ["rtx3090", "rtx4090", "l4", "a10", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "h800-80gb"]
GiB = 2**30


def test_catalogue_has_every_required_gpu():
    assert sorted(list_gpus()) == sorted(REQUIRED)


@pytest.mark.parametrize("name", REQUIRED)
def test_profiles_are_plausible(name):
    gpu = load_gpu(name)
    assert isinstance(gpu, GpuProfile) and gpu.name == name
    assert isinstance(gpu.memory_bytes, int)
    # CUDA reports a little less than the marketed size (24, 40, 80, 141 GB)
    marketed_gb = {"a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h800-80gb": 80, "h200-141gb": 141}.get(name, 24)
    assert 0.9 * marketed_gb * 1e9 < gpu.memory_bytes <= marketed_gb * GiB
    assert gpu.pcie_gen in (4, 5)
    assert gpu.pcie_bandwidth_Bps == {4: 25e9, 5: 50e9}[gpu.pcie_gen]
    assert 0 < gpu.fp32_flops < gpu.bf16_flops < 1.1e15
    assert 2e11 < gpu.hbm_bandwidth_Bps < 5e12


def test_known_figures():
    h100 = load_gpu("h100")
    assert (h100.bf16_flops, h100.hbm_bandwidth_Bps, h100.pcie_gen) == (989.4e12, 3.35e12, 5)
    a100 = load_gpu("A100-80GB")
    assert (a100.bf16_flops, a100.fp32_flops, a100.hbm_bandwidth_Bps) == (312e12, 19.5e12, 2039e9)
    assert load_gpu("h200").memory_bytes > load_gpu("h100").memory_bytes


@pytest.mark.parametrize("alias", ["4090", "RTX 4090", "rtx-4090", "NVIDIA GeForce RTX 4090", "RTX4090"])
def test_aliases_case_and_device_names(alias):
    assert load_gpu(alias).name == "rtx4090"


def test_device_name_strings_resolve():
    assert load_gpu("NVIDIA H100 80GB HBM3").name == "h100-80gb"
    assert load_gpu("NVIDIA A100-SXM4-80GB").name == "a100-80gb"
    assert load_gpu("NVIDIA L4").name == "l4"


def test_hardware_defaults_and_overrides():
    hw = hardware()
    assert isinstance(hw, Hardware) and hw.gpu.name == "rtx4090" and hw.num_gpus == 1
    defaults = host_defaults()
    assert hw.host_bandwidth_Bps == defaults["host_bandwidth_Bps"] == 50e9
    assert hw.nvme_bandwidth_Bps == min(hw.nvme_read_Bps, hw.nvme_write_Bps) == 4e9
    assert 0 < hw.mfu <= 1

    hw = hardware("h100", memory_bytes="80GB", mfu=0.5, num_gpus=2, host_bandwidth_Bps=100e9)
    assert hw.gpu.memory_bytes == 80 * 10**9 and hw.gpu.name == "h100-80gb"
    assert (hw.mfu, hw.num_gpus, hw.host_bandwidth_Bps) == (0.5, 2, 100e9)
    assert hardware("l4", nvme_read_Bps=3e9, nvme_write_Bps=2e9).nvme_bandwidth_Bps == 2e9
    assert hardware(load_gpu("a10"), memory_bytes=GiB).gpu.memory_bytes == GiB
    assert load_gpu("h100").memory_bytes != 80 * 10**9  # overrides never touch the catalogue


def one_line_error(fn, *fragments):
    with pytest.raises(ChunkftError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_input():
    one_line_error(lambda: load_gpu("tpu-v5"), "'tpu-v5'", "rtx4090", "h200-141gb")
    one_line_error(lambda: load_gpu("a100"), "ambiguous", "a100-40gb or a100-80gb")
    one_line_error(lambda: hardware("v100"), "'v100'", "known GPUs")
    one_line_error(lambda: hardware(mfu=1.5), "mfu")
    one_line_error(lambda: hardware(mfu=0), "mfu")
    one_line_error(lambda: hardware(num_gpus=1.5), "num_gpus", "1.5")
    one_line_error(lambda: hardware(num_gpus=0), "num_gpus")
    one_line_error(lambda: hardware(memory_bytes="24XB"), "'24XB'")
    one_line_error(lambda: hardware(hbm_bandwidth_Bps="fast"), "hbm_bandwidth_Bps", "'fast'")
    one_line_error(lambda: hardware(gpu_memory=1), "'gpu_memory'", "memory_bytes")


NODES = {  # name: (GPU kind, GPUs, host RAM, NVMe data bytes), as their vendor / cloud sources say
    "dgx-h100": ("h100-80gb", 8, 2 * 2**40, 8 * 3_840_000_000_000),
    "dgx-h800": ("h800-80gb", 8, 2 * 2**40, 8 * 3_840_000_000_000),
    "dgx-h200": ("h200-141gb", 8, 2 * 2**40, 8 * 3_840_000_000_000),
    "dgx-a100-640gb": ("a100-80gb", 8, 2 * 2**40, 8 * 3_840_000_000_000),
    "dgx-a100-320gb": ("a100-40gb", 8, 2**40, 4 * 3_840_000_000_000),
    "rtx4090-workstation": ("rtx4090", 1, 128 * GiB, 2_000_000_000_000),
    "rtx3090-workstation": ("rtx3090", 1, 128 * GiB, 2_000_000_000_000),
    "gcp-g2-standard-96": ("l4", 8, 384 * GiB, 8 * 375 * GiB),
    "gcp-g2-standard-8": ("l4", 1, 32 * GiB, 375 * GiB),
    "lambda-1x-a10": ("a10", 1, 200 * GiB, int(1.4 * 2**40)),
}


def test_node_catalogue_figures_and_sources():
    import json

    from planner.hardware import HARDWARE_DIR, list_nodes, load_node

    assert list_nodes() == sorted(NODES)
    for name, (gpu, gpus, host, disk) in NODES.items():
        node = load_node(name)
        assert (node.gpu, node.gpus, node.host_ram_bytes, node.disk_bytes) == (gpu, gpus, host, disk), name
        sources = json.loads((HARDWARE_DIR / f"node-{name}.json").read_text())["sources"]
        assert "host_ram_bytes" in sources and "disk_bytes" in sources  # where each figure comes from
    assert load_node("DGX H800").name == "dgx-h800" and load_node("g2-standard-8").name == "gcp-g2-standard-8"
    # node files are not GPUs
    assert not any(g.startswith("node") or g.startswith("dgx") for g in list_gpus())


def test_every_gpu_kind_has_one_default_node():
    from planner.hardware import default_node

    for name in REQUIRED:
        node = default_node(name)
        assert node.gpu == name and node.gpus >= 1
    assert default_node("h800").name == "dgx-h800" and default_node("4090").name == "rtx4090-workstation"
    assert default_node(load_gpu("l4")).name == "gcp-g2-standard-96"


def test_unknown_node_is_one_line():
    from planner.hardware import load_node

    with pytest.raises(ChunkftError, match=r"unknown node 'dgx-h900'; known nodes: dgx-a100-320gb, ") as e:
        load_node("dgx-h900")
    assert "\n" not in str(e.value)
