"""Hardware profiles: GPU catalogue, node catalogue and host defaults, read from planner/hardware/*.json.

Each GPU file holds the CUDA-reported memory, HBM bandwidth, dense bf16 and fp32 FLOPS and the
PCIe link, with its sources; host.json holds host-memory bandwidth, NVMe sequential read and
write bandwidth and the default MFU. Every figure can be overridden through `hardware(...)`.

Node files (node-<name>.json) are whole machines as sold or rented: the GPU kind and count, the
host RAM and the NVMe data capacity, each with its vendor or cloud source (`NodeProfile`,
`load_node`). Every catalogue GPU kind has a default node (`default_node`: its file's
"default_for"), whose host RAM and disk `chunkft size` and `chunkft plan --gpus-per-node` hold a
plan to unless told otherwise (--node, --host-ram, --disk).

Names are matched case-insensitively ignoring spaces, dashes and underscores, with the
"NVIDIA"/"GeForce" prefixes of `torch.cuda.get_device_name()` dropped, so "RTX 4090", "4090"
and "NVIDIA GeForce RTX 4090" all name rtx4090.

Known limitations: one GPU kind per Hardware; interconnect (NVLink / network) bandwidth for
several GPUs is not modelled here (planner.sharding); a node's NVMe bandwidth is host.json's
(one drive's sustained figures), not the node's RAID; host RAM is what the node has installed,
not what the OS leaves free (a few GiB less).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from planner.errors import ChunkftError
from planner.fsio import read_json
from planner.units import parse_bytes

HARDWARE_DIR = Path(__file__).with_name("hardware")
HOST_FILE = "host.json"
NODE_PREFIX = "node-"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GpuProfile:
    """One GPU kind: what limits a single-GPU training step."""

    name: str
    """Catalogue name, e.g. "rtx4090"."""
    memory_bytes: int
    """Total device memory as CUDA reports it (torch.cuda.get_device_properties().total_memory)."""
    hbm_bandwidth_Bps: float
    """Device memory bandwidth, bytes per second (vendor peak)."""
    bf16_flops: float
    """Dense bf16 tensor-core FLOPS with fp32 accumulation (no 2:4 sparsity)."""
    fp32_flops: float
    """Dense fp32 FLOPS on CUDA cores (not TF32)."""
    pcie_gen: int
    """PCIe generation of the host link."""
    pcie_bandwidth_Bps: float
    """Practical x16 host<->device bandwidth with pinned memory, bytes per second, per direction."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    """A machine to plan for: GPU kind and count plus host memory, NVMe and efficiency."""

    gpu: GpuProfile
    host_bandwidth_Bps: float
    """Host DRAM bandwidth a CPU optimizer step can stream, bytes per second."""
    nvme_bandwidth_Bps: float
    """NVMe bandwidth for round trips (the slower of sequential read and write), bytes per second."""
    mfu: float
    """Model FLOPS utilisation: achieved / peak bf16 FLOPS for the step's matmuls, in (0, 1]."""
    num_gpus: int = 1
    nvme_read_Bps: float | None = None
    """Sequential NVMe read; None means nvme_bandwidth_Bps."""
    nvme_write_Bps: float | None = None
    """Sequential NVMe write; None means nvme_bandwidth_Bps."""


_GPU_FIELDS = tuple(f.name for f in dataclasses.fields(GpuProfile) if f.name != "name")
_HOST_FIELDS = tuple(f.name for f in dataclasses.fields(Hardware) if f.name != "gpu")


def _normalize(name: str) -> str:
    folded = re.sub(r"[^a-z0-9]", "", name.lower())
    for prefix in ("nvidia", "geforce"):
        folded = folded.removeprefix(prefix)
    return folded


@functools.cache
def _catalogue() -> dict[str, dict]:
    """GPU name -> its file's content."""
    out = {}
    for path in sorted(HARDWARE_DIR.glob("*.json")):
        if path.name != HOST_FILE and not path.name.startswith(NODE_PREFIX):
            out[path.stem] = read_json(path, what="GPU profile")
    return out


@functools.cache
def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, entry in _catalogue().items():
        for alias in [name, *entry.get("aliases", [])]:
            key = _normalize(alias)
            assert table.get(key, name) == name, f"GPU alias {alias!r} names two profiles"
            table[key] = name
    return table


def list_gpus() -> list[str]:
    """Catalogue GPU names, smallest memory first."""
    return sorted(_catalogue(), key=lambda n: (_catalogue()[n]["memory_bytes"], n))


def load_gpu(name: str) -> GpuProfile:
    """The catalogue profile for `name` (case-insensitive, aliases allowed)."""
    key = _aliases().get(_normalize(str(name)))
    if key is None:
        folded = _normalize(str(name))
        close = [n for n in list_gpus() if folded and n.startswith(folded)]
        hint = f" (ambiguous: {' or '.join(close)}?)" if len(close) > 1 else ""
        raise ChunkftError(f"unknown GPU {name!r}{hint}; known GPUs: {', '.join(list_gpus())}")
    entry = _catalogue()[key]
    return GpuProfile(name=key, **{f: _number(entry[f], f, key) for f in _GPU_FIELDS})


@functools.cache
def host_defaults() -> dict[str, float]:
    """host.json's defaults, as Hardware field values."""
    entry = read_json(HARDWARE_DIR / HOST_FILE, what="host profile")
    read_Bps, write_Bps = float(entry["nvme_read_Bps"]), float(entry["nvme_write_Bps"])
    return {
        "host_bandwidth_Bps": float(entry["host_bandwidth_Bps"]),
        "nvme_bandwidth_Bps": min(read_Bps, write_Bps),
        "nvme_read_Bps": read_Bps,
        "nvme_write_Bps": write_Bps,
        "mfu": float(entry["mfu"]),
    }


def hardware(gpu: str | GpuProfile = "rtx4090", **overrides) -> Hardware:
    """A Hardware profile: catalogue GPU plus host.json defaults, any field overridden.

    Overrides may name any GpuProfile field (memory_bytes accepts "24GiB") or Hardware field.
    """
    profile = gpu if isinstance(gpu, GpuProfile) else load_gpu(gpu)
    unknown = sorted(set(overrides) - set(_GPU_FIELDS) - set(_HOST_FIELDS))
    if unknown:
        raise ChunkftError(f"unknown hardware setting {unknown[0]!r}; settings are: "
                           f"{', '.join(_GPU_FIELDS + _HOST_FIELDS)}")
    gpu_changes = {}
    for field in _GPU_FIELDS:
        if overrides.get(field) is not None:
            value = overrides[field]
            if field == "memory_bytes":
                value = parse_bytes(value, what="GPU memory")
            gpu_changes[field] = _number(value, field, profile.name)
    profile = dataclasses.replace(profile, **gpu_changes)
    values = dict(host_defaults())
    for field in _HOST_FIELDS:
        if overrides.get(field) is not None:
            values[field] = _number(overrides[field], field, "hardware override")
    if "nvme_bandwidth_Bps" not in overrides and ("nvme_read_Bps" in overrides or "nvme_write_Bps" in overrides):
        values["nvme_bandwidth_Bps"] = min(values["nvme_read_Bps"], values["nvme_write_Bps"])
    if not 0 < values["mfu"] <= 1:
        raise ChunkftError(f"invalid mfu {values['mfu']!r}: must be in (0, 1]")
    return Hardware(gpu=profile, **values)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NodeProfile:
    """One machine: its GPUs, host RAM and NVMe data capacity (a node of a sharded run)."""

    name: str
    gpu: str
    """Catalogue GPU kind."""
    gpus: int
    """GPUs in the node."""
    host_ram_bytes: int
    """Installed host RAM."""
    disk_bytes: int
    """NVMe data capacity (OS drives not counted)."""

    def describe(self) -> str:
        from planner.units import format_bytes

        return (f"{self.name}: {self.gpus} x {self.gpu}, {format_bytes(self.host_ram_bytes)} host RAM, "
                f"{format_bytes(self.disk_bytes)} NVMe")


@functools.cache
def _nodes() -> dict[str, dict]:
    """Node name -> its file's content."""
    return {path.stem.removeprefix(NODE_PREFIX): read_json(path, what="node profile")
            for path in sorted(HARDWARE_DIR.glob(f"{NODE_PREFIX}*.json"))}


@functools.cache
def _node_aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, entry in _nodes().items():
        for alias in [name, *entry.get("aliases", [])]:
            key = _normalize(alias)
            assert table.get(key, name) == name, f"node alias {alias!r} names two profiles"
            table[key] = name
    return table


def list_nodes() -> list[str]:
    """Catalogue node names, alphabetically."""
    return sorted(_nodes())


def load_node(name: str) -> NodeProfile:
    """The catalogue node `name` (case-insensitive, aliases allowed)."""
    key = _node_aliases().get(_normalize(str(name)))
    if key is None:
        raise ChunkftError(f"unknown node {name!r}; known nodes: {', '.join(list_nodes())}")
    entry = _nodes()[key]
    gpu = load_gpu(entry["gpu"]).name
    return NodeProfile(name=key, gpu=gpu, gpus=_number(entry["gpus"], "num_gpus", key),
                       host_ram_bytes=_number(entry["host_ram_bytes"], "host_ram_bytes", key),
                       disk_bytes=_number(entry["disk_bytes"], "disk_bytes", key))


def default_node(gpu: str | GpuProfile) -> NodeProfile:
    """The node a GPU kind is planned on unless told otherwise (its "default_for" file)."""
    kind = gpu.name if isinstance(gpu, GpuProfile) else load_gpu(gpu).name
    found = [n for n, e in _nodes().items() if kind in e.get("default_for", [])]
    assert len(found) == 1, f"GPU kind {kind!r} has {len(found)} default nodes: {found}"
    return load_node(found[0])


def _number(value, field: str, where: str):
    """A positive int (for *_bytes, pcie_gen, num_gpus) or float; ChunkftError otherwise."""
    integral = field.endswith("_bytes") or field in ("pcie_gen", "num_gpus")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0 or (integral and number != int(number)):
        kind = "positive integer" if integral else "positive number"
        raise ChunkftError(f"invalid {field} {value!r} for {where}: must be a {kind}")
    return int(number) if integral else number
