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
