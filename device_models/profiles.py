"""Accelerator profiles: the datasheet figures a step's time is built from.

Figures are per device, SXM parts, dense bf16 (no sparsity), one direction of each link. Memory is
the total ``nvidia-smi`` reports; an engine gets ``gpu_memory_utilization`` of it. How much of
each peak a real step reaches is not a datasheet figure: it lives in the device's calibration
(``device_models.calibration``).
"""

from __future__ import annotations

import dataclasses

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int  # HBM, total
    memory_bps: float  # HBM bandwidth, bytes/s
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    host_link_bps: float  # PCIe, one direction, bytes/s (KV swap to and from host memory)
    interconnect_bps: float  # NVLink, one direction, bytes/s (tensor/expert-parallel collectives)
    # Between hosts: the GPU's own RDMA NIC (one per GPU on HGX/DGX boards), one direction, bytes/s; and
    # the latency one cross-host collective adds (NCCL over InfiniBand, small messages)
    network_bps: float
    network_latency_s: float
    source: str  # where the figures come from

    def __post_init__(self):
        for field in ("memory_bytes", "memory_bps", "bf16_flops", "host_link_bps", "interconnect_bps", "network_bps",
                      "network_latency_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"DeviceProfile.{field} must be > 0, got {getattr(self, field)!r}")


DEVICES = {
    "h200": DeviceProfile(
        "h200", memory_bytes=143771 * MIB, memory_bps=4.8e12, bf16_flops=989e12, host_link_bps=64e9,
        interconnect_bps=450e9, network_bps=50e9, network_latency_s=15e-6,
        source="NVIDIA H200 SXM datasheet (141 GB HBM3e, 4.8 TB/s, PCIe Gen5 x16, NVLink 900 GB/s); DGX H200 "
               "networking (one ConnectX-7 400 Gb/s InfiniBand NDR per GPU); NCCL inter-node small-message "
               "all-reduce latency, order of magnitude (not measured here)",
    ),
    "h100": DeviceProfile(
        "h100", memory_bytes=81559 * MIB, memory_bps=3.35e12, bf16_flops=989e12, host_link_bps=64e9,
        interconnect_bps=450e9, network_bps=50e9, network_latency_s=15e-6,
        source="NVIDIA H100 SXM5 80GB datasheet (HBM3 3.35 TB/s, PCIe Gen5 x16, NVLink 900 GB/s); DGX H100 "
               "networking (one ConnectX-7 400 Gb/s per GPU); NCCL inter-node latency as for h200",
    ),
    "a100-40gb": DeviceProfile(
        "a100-40gb", memory_bytes=40960 * MIB, memory_bps=1.555e12, bf16_flops=312e12, host_link_bps=32e9,
        interconnect_bps=300e9, network_bps=25e9, network_latency_s=15e-6,
        source="NVIDIA A100 SXM4 40GB datasheet (HBM2 1.555 TB/s, PCIe Gen4 x16, NVLink 600 GB/s); DGX A100 "
               "networking (one ConnectX-6 200 Gb/s HDR per GPU); NCCL inter-node latency as for h200",
    ),
}


def device_profile(name: str) -> DeviceProfile:
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
