"""Scenarios of the placement benchmark (bench/placement.py): a datasheet catalog, realistic
heterogeneous clusters with measured links, and the seeded random mixes of the timing part.

A cluster is a list of :class:`PlacementDevice` values, as ``find_candidates`` would build them
from the telemetry, and the links between its nodes as ``State.gpu_links`` would report them
(every ordered pair of nodes measured, so no default link is ever assumed). Everything is
deterministic: no clock, no unseeded randomness.
"""

import random
from dataclasses import dataclass, field

from exo.master.cost_model import LinkCost, PlacementDevice
from exo.shared.types.gpu import PeerLinkKind
from exo.shared.types.ids import NodeId
from exo.shared.types.memory import GIB
from exo.shared.types.models import ModelCard

Links = dict[NodeId, dict[NodeId, LinkCost]]


# --- catalog ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    vendor: str
    backend: str
    memory_gib: float
    """Memory of the device (for Apple silicon and CPUs: the configuration's default)."""
    bandwidth_gbps: float
    """Peak memory bandwidth, GB/s, from the vendor's datasheet."""
    tflops_fp16: float
    """Peak fp16 TFLOPS, dense (no structured sparsity)."""


CATALOG: dict[str, Spec] = {
    # NVIDIA GeForce: product pages (memory, bandwidth) and the Ada Lovelace / Ampere GA102
    # architecture whitepapers (FP16 tensor TFLOPS with FP32 accumulate, dense). The laptop
    # 4090 / 3080: NVIDIA's laptop spec pages (memory, bus width × data rate); their TFLOPS
    # scaled from the desktop parts by cores × boost clock (NVIDIA publishes no figure).
    "4090": Spec("RTX 4090", "NVIDIA", "cuda", 24, 1008, 165.2),
    "4080": Spec("RTX 4080", "NVIDIA", "cuda", 16, 716.8, 97.5),
    "3090": Spec("RTX 3090", "NVIDIA", "cuda", 24, 936, 71.0),
    "3070": Spec("RTX 3070", "NVIDIA", "cuda", 8, 448, 40.6),
    "3060": Spec("RTX 3060", "NVIDIA", "cuda", 12, 360, 25.6),
    "4090L": Spec("RTX 4090 Laptop", "NVIDIA", "cuda", 16, 576, 80.0),
    "3080L": Spec("RTX 3080 Laptop", "NVIDIA", "cuda", 16, 448, 40.0),
    # NVIDIA professional / datacenter: RTX 6000 Ada, T4, L4, A100 (SXM), H100 (SXM and
    # PCIe), H200 (SXM) datasheets; FP16 tensor TFLOPS without sparsity.
    "6000ada": Spec("RTX 6000 Ada", "NVIDIA", "cuda", 48, 960, 182.2),
    "T4": Spec("Tesla T4", "NVIDIA", "cuda", 16, 320, 65.0),
    "L4": Spec("L4", "NVIDIA", "cuda", 24, 300, 121.0),
    "A100-40": Spec("A100 40GB", "NVIDIA", "cuda", 40, 1555, 312.0),
    "A100-80": Spec("A100 80GB", "NVIDIA", "cuda", 80, 2039, 312.0),
    "H100": Spec("H100 SXM", "NVIDIA", "cuda", 80, 3350, 989.0),
    "H100-PCIe": Spec("H100 PCIe", "NVIDIA", "cuda", 80, 2000, 756.0),
    "H200": Spec("H200 SXM", "NVIDIA", "cuda", 141, 4800, 989.0),
    # Apple silicon: Apple's product pages (unified memory bandwidth; GPU TFLOPS as Apple
    # states them for M2 / M2 Pro / M2 Max / M2 Ultra — the GPU runs fp16 at its fp32 rate).
    # Apple publishes no TFLOPS for the M3 Max; cores × clock like the M2 Max. The M3 Max
    # with the 30-core GPU (36 / 96 GB) has 300 GB/s, the 40-core one 400 GB/s.
    "M2": Spec("Apple M2", "Apple", "metal", 24, 100, 3.6),
    "M2 Pro": Spec("Apple M2 Pro", "Apple", "metal", 32, 200, 6.8),
    "M2 Max": Spec("Apple M2 Max", "Apple", "metal", 96, 400, 13.6),
    "M2 Ultra": Spec("Apple M2 Ultra", "Apple", "metal", 192, 800, 27.2),
    "M3 Max": Spec("Apple M3 Max", "Apple", "metal", 128, 400, 16.4),
    "M3 Max 30c": Spec("Apple M3 Max (30-core GPU)", "Apple", "metal", 36, 300, 12.3),
    # CPUs: channels × transfer rate × 8 bytes (JEDEC), the memory a node typically has.
    # fp16 TFLOPS: AVX2/AVX-512 FMA width × cores × clock, rounded.
    "DDR4 desktop": Spec("CPU (2ch DDR4-3200)", "cpu", "cpu", 64, 51.2, 1.0),
    "DDR5 desktop": Spec("CPU (2ch DDR5-5600)", "cpu", "cpu", 96, 89.6, 1.5),
    "Xeon E5 v4": Spec("CPU (Xeon E5 v4, 4ch DDR4-2400)", "cpu", "cpu", 256, 76.8, 1.5),
    "EPYC 7003": Spec("CPU (EPYC 7003, 8ch DDR4-3200)", "cpu", "cpu", 256, 204.8, 3.0),
    "EPYC 9004": Spec("CPU (EPYC 9004, 12ch DDR5-4800)", "cpu", "cpu", 512, 460.8, 6.0),
}

APPLE_WORKING_SET_FRACTION = 0.75
"""macOS lets the GPU wire about 75 % of unified memory (MLX's recommended working set)."""


# --- devices -------------------------------------------------------------------------------
def _device(
    node: str,
    device_id: str,
    key: str,
    memory_gib: float | None,
    used_gib: float,
    **facts: object,
) -> PlacementDevice:
    """A catalogue device with ``used_gib`` of its memory taken; ``facts`` add live
    readings and anything else ``PlacementDevice`` takes."""
    spec = CATALOG[key]
    total = int((spec.memory_gib if memory_gib is None else memory_gib) * GIB)
    return PlacementDevice.model_validate(
        {
            "node_id": node,
            "device_id": device_id,
            "name": spec.name,
            "vendor": spec.vendor,
            "backend": spec.backend,
            "memory_total_bytes": total,
            "memory_free_bytes": max(0, total - int(used_gib * GIB)),
            "memory_bandwidth_gbps": spec.bandwidth_gbps,
            "peak_tflops_fp16": spec.tflops_fp16,
            **facts,
        }
    )


def _live(
    util: float, temp_c: float, throttle_c: float, throttling: bool, battery: float | None
) -> dict[str, object]:
    return {
        "utilization_percent": util,
        "temperature_c": temp_c,
        "throttle_threshold_c": throttle_c,
        "is_thermal_throttling": throttling,
        "battery_percent": 100.0 if battery is None else battery,
        "is_plugged_in": battery is None,
    }


def gpu(
    node: str,
    key: str,
    index: int = 0,
    *,
    used_gib: float = 0.5,
    util: float = 0.0,
    temp_c: float = 60.0,
    throttle_c: float = 90.0,
    throttling: bool = False,
    battery: float | None = None,
) -> PlacementDevice:
    """A discrete NVIDIA GPU; ``battery`` set: the laptop is unplugged at that charge."""
    live = _live(util, temp_c, throttle_c, throttling, battery)
    return _device(node, f"cuda:{index}", key, None, used_gib, **live)


def mac(
    node: str,
    key: str,
    memory_gib: float | None = None,
    *,
    used_gib: float = 8.0,
    util: float = 0.0,
    temp_c: float = 55.0,
    throttle_c: float = 100.0,
    throttling: bool = False,
    battery: float | None = None,
) -> PlacementDevice:
    """An Apple-silicon Mac: unified memory, the GPU's working set capped at 75 % of it."""
    total = int((CATALOG[key].memory_gib if memory_gib is None else memory_gib) * GIB)
    live = _live(util, temp_c, throttle_c, throttling, battery)
    working_set = int(total * APPLE_WORKING_SET_FRACTION)
    return _device(
        node, "metal:0", key, memory_gib, used_gib, max_working_set_bytes=working_set, **live
    )


def cpu(
    node: str, key: str, memory_gib: float | None = None, *, used_gib: float = 6.0
) -> PlacementDevice:
    """A node without a usable GPU that offers its CPU and RAM (datasheet bandwidth)."""
    return _device(node, "cpu:0", key, memory_gib, used_gib, is_cpu_fallback=True)


def peered(devices: list[PlacementDevice], kind: PeerLinkKind) -> list[PlacementDevice]:
    """The GPUs of one node, each told how it reaches the others (NVML's topology)."""
    return [
        device.model_copy(
            update={
                "peer_links": {
                    other.device_id: kind
                    for other in devices
                    if other.device_id != device.device_id
                }
            }
        )
        for device in devices
    ]


def node_gpus(
    node: str, *keys: str, link: PeerLinkKind, used_gib: float = 0.5
) -> list[PlacementDevice]:
    """Several idle GPUs of one node (cuda:0, cuda:1, …) joined by ``link``."""
    return peered(
        [gpu(node, key, index, used_gib=used_gib) for index, key in enumerate(keys)], link
    )


# --- networks ------------------------------------------------------------------------------
NETWORKS: dict[str, LinkCost] = {
    # One-way latency of a hidden-state message and achievable TCP throughput, as exo's link
    # probe measures them on each medium (iperf-class throughput, not the line rate).
    "100GbE": LinkCost(latency_ms=0.02, bandwidth_mbps=90_000.0),
    "25GbE": LinkCost(latency_ms=0.04, bandwidth_mbps=23_000.0),
    "TB4": LinkCost(latency_ms=0.06, bandwidth_mbps=18_000.0),
    "10GbE": LinkCost(latency_ms=0.08, bandwidth_mbps=9_400.0),
    "1GbE": LinkCost(latency_ms=0.25, bandwidth_mbps=940.0),
    "Wi-Fi": LinkCost(latency_ms=3.0, bandwidth_mbps=300.0),
}
NETWORK_RANK = ["100GbE", "25GbE", "TB4", "10GbE", "1GbE", "Wi-Fi"]
"""Best first: between two nodes on different media, the worse medium sets the link."""


@dataclass
class Cluster:
    name: str
    devices: list[PlacementDevice]
    network: str = "1GbE"
    """Every node's attachment unless ``uplinks`` names another."""
    uplinks: dict[str, str] = field(default_factory=dict[str, str])
    direct: dict[tuple[str, str], str] = field(default_factory=dict[tuple[str, str], str])
    """Cables between two nodes (a Thunderbolt bridge), either direction."""

    def links(self) -> Links:
        nodes = sorted({str(device.node_id) for device in self.devices})

        def medium(source: str, destination: str) -> str:
            cable = self.direct.get((source, destination)) or self.direct.get((destination, source))
            if cable is not None:
                return cable
            media = [self.uplinks.get(node, self.network) for node in (source, destination)]
            return max(media, key=NETWORK_RANK.index)

        return {
            NodeId(source): {
                NodeId(destination): NETWORKS[medium(source, destination)]
                for destination in nodes
                if destination != source
            }
            for source in nodes
        }


@dataclass
class Scenario:
    name: str
    model_key: str
    card: ModelCard
    devices: list[PlacementDevice]
    links: Links


def clusters() -> list[Cluster]:
    """Realistic heterogeneous clusters: homes, labs, offices and cloud machines."""
    return [
        # --- gaming PCs and home labs ---
        Cluster(
            "4090 + 3060 PCs, 1GbE",
            [gpu("gamer", "4090", used_gib=1.2), gpu("den", "3060", used_gib=0.8)],
        ),
        Cluster(
            "4090 + 3090 + 3060 PCs, 1GbE",
            [
                gpu("gamer", "4090", used_gib=1.2),
                gpu("study", "3090", used_gib=0.9),
                gpu("den", "3060", used_gib=0.8),
            ],
        ),
        Cluster(
            "4090+3090 PC (PCIe) + M2 Max 32 laptop, Wi-Fi",
            [
                *peered(
                    [gpu("rig", "4090", 0, used_gib=1.0), gpu("rig", "3090", 1, used_gib=0.3)],
                    "pcie_host",
                ),
                mac("mbp", "M2 Max", 32, used_gib=10),
            ],
            uplinks={"mbp": "Wi-Fi"},
        ),
        Cluster(
            "2x3090 NVLink bridge + 3060 PC, 10GbE",
            [*node_gpus("rig", "3090", "3090", link="nvlink"), gpu("den", "3060")],
            network="10GbE",
        ),
        Cluster(
            "4090 PC + DDR4 CPU server 64 GB, 1GbE",
            [gpu("gamer", "4090", used_gib=1.2), cpu("nas", "DDR4 desktop")],
        ),
        Cluster(
            "3060 PC + DDR5 CPU desktop 96 GB, 1GbE",
            [gpu("den", "3060", used_gib=0.8), cpu("office", "DDR5 desktop")],
        ),
        Cluster(
            "4090 busy 60% (gaming) + idle 3090, 1GbE",
            [gpu("gamer", "4090", used_gib=7.0, util=60), gpu("study", "3090", used_gib=0.9)],
        ),
        Cluster(
            "throttling 4090 laptop on battery + 3090, Wi-Fi",
            [
                gpu(
                    "laptop",
                    "4090L",
                    used_gib=0.6,
                    temp_c=93,
                    throttle_c=87,
                    throttling=True,
                    battery=55,
                ),
                gpu("study", "3090", used_gib=0.9),
            ],
            uplinks={"laptop": "Wi-Fi"},
        ),
        Cluster(
            "4090 + 4080 + 3070 PCs, 1GbE",
            [
                gpu("gamer", "4090", used_gib=1.2),
                gpu("kid", "4080", used_gib=1.0),
                gpu("den", "3070", used_gib=0.7),
            ],
        ),
        Cluster(
            "4090 near throttle (85/87 C) + 3090, 10GbE",
            [
                gpu("gamer", "4090", used_gib=1.2, temp_c=85, throttle_c=87),
                gpu("study", "3090", used_gib=0.9),
            ],
            network="10GbE",
        ),
        Cluster(
            "4090 on Wi-Fi + 4090 on 10GbE + M2 Ultra 128",
            [
                gpu("upstairs", "4090", used_gib=1.2),
                gpu("rack", "4090", used_gib=0.3),
                mac("studio", "M2 Ultra", 128),
            ],
            network="10GbE",
            uplinks={"upstairs": "Wi-Fi"},
        ),
        Cluster(
            "3090+3060+3060 PC (PCIe) + M2 Max 32, 10GbE",
            [
                *peered(
                    [gpu("rig", "3090", 0), gpu("rig", "3060", 1), gpu("rig", "3060", 2)],
                    "pcie_host",
                ),
                mac("mbp", "M2 Max", 32, used_gib=9),
            ],
            network="10GbE",
        ),
        Cluster(
            "4x3090 workstation, two busy (50/75%), PCIe",
            peered(
                [
                    gpu("ws", "3090", 0),
                    gpu("ws", "3090", 1, used_gib=6.0, util=50),
                    gpu("ws", "3090", 2, used_gib=10.0, util=75),
                    gpu("ws", "3090", 3),
                ],
                "pcie_host",
            ),
        ),
        # --- Macs ---
        Cluster(
            "M2 Ultra 192 + M2 Max 96, Thunderbolt",
            [mac("studio", "M2 Ultra", 192), mac("mbp", "M2 Max", 96, used_gib=12)],
            network="TB4",
        ),
        Cluster(
            "M3 Max 128 on battery + M2 Ultra 64, Thunderbolt",
            [
                mac("mbp", "M3 Max", 128, used_gib=14, battery=70),
                mac("studio", "M2 Ultra", 64),
            ],
            network="TB4",
        ),
        Cluster(
            "M3 Max 128 at 15% battery + M2 Ultra 64, Thunderbolt",
            [
                mac("mbp", "M3 Max", 128, used_gib=14, battery=15),
                mac("studio", "M2 Ultra", 64),
            ],
            network="TB4",
        ),
        Cluster(
            "M2 Max 32 + M3 Max 36 (30-core), Wi-Fi",
            [mac("mbp1", "M2 Max", 32, used_gib=10), mac("mbp2", "M3 Max 30c", 36, used_gib=10)],
            network="Wi-Fi",
        ),
        Cluster(
            "2x M2 Ultra 192 + M3 Max 128, Thunderbolt",
            [
                mac("studio1", "M2 Ultra", 192),
                mac("studio2", "M2 Ultra", 192, used_gib=20),
                mac("mbp", "M3 Max", 128, used_gib=12),
            ],
            network="TB4",
        ),
        Cluster(
            "M2 Ultra 128 + 4090 PC, 10GbE",
            [mac("studio", "M2 Ultra", 128), gpu("gamer", "4090", used_gib=1.2)],
            network="10GbE",
        ),
        Cluster(
            "MacBook Air M2 24 + M2 Max 64, Wi-Fi",
            [mac("air", "M2", 24, used_gib=8), mac("mbp", "M2 Max", 64, used_gib=10)],
            network="Wi-Fi",
        ),
        Cluster(
            "throttling M3 Max 64 + M2 Max 96 + 4090 PC",
            [
                mac("mbp", "M3 Max", 64, used_gib=10, temp_c=105, throttle_c=100, throttling=True),
                mac("studio", "M2 Max", 96),
                gpu("gamer", "4090", used_gib=1.2),
            ],
            network="10GbE",
            direct={("mbp", "studio"): "TB4"},
        ),
        Cluster(
            "M2 Pro mini 32 + 3060 PC + DDR5 CPU node, 1GbE",
            [
                mac("mini", "M2 Pro", 32, used_gib=6),
                gpu("den", "3060"),
                cpu("office", "DDR5 desktop"),
            ],
        ),
        # --- workstations and datacenter ---
        Cluster(
            "A100-80 + H100 workstations, 10GbE",
            [gpu("ws1", "A100-80"), gpu("ws2", "H100")],
            network="10GbE",
        ),
        Cluster(
            "H200 + 2x A100-80 NVLink node, 100GbE",
            [gpu("h200", "H200"), *node_gpus("a100", "A100-80", "A100-80", link="nvlink")],
            network="100GbE",
        ),
        Cluster(
            "8x H100 NVLink, one GPU busy 70%",
            peered(
                [
                    gpu(
                        "dgx", "H100", i, used_gib=30.0 if i == 3 else 0.5, util=70 if i == 3 else 0
                    )
                    for i in range(8)
                ],
                "nvlink",
            ),
        ),
        Cluster(
            "4x A100-80 + 4x H100 NVLink nodes, 100GbE",
            [
                *node_gpus("a100", *["A100-80"] * 4, link="nvlink"),
                *node_gpus("h100", *["H100"] * 4, link="nvlink"),
            ],
            network="100GbE",
        ),
        Cluster(
            "8x A100-80 NVLink, busy 40/80% + one throttling",
            peered(
                [
                    gpu(
                        "dgx",
                        "A100-80",
                        i,
                        used_gib={1: 12.0, 5: 40.0}.get(i, 0.5),
                        util={1: 40.0, 5: 80.0}.get(i, 0.0),
                        temp_c=88 if i == 6 else 62,
                        throttle_c=85,
                        throttling=i == 6,
                    )
                    for i in range(8)
                ],
                "nvlink",
            ),
        ),
        Cluster(
            "2x H100 NVLink + 2x A100-80 NVLink nodes over 1GbE",
            [
                *node_gpus("h100", "H100", "H100", link="nvlink"),
                *node_gpus("a100", "A100-80", "A100-80", link="nvlink"),
            ],
        ),
        Cluster(
            "H100 PCIe workstation + 4090 + 3090 PCs, 10GbE",
            [gpu("ws", "H100-PCIe"), gpu("gamer", "4090", used_gib=1.2), gpu("study", "3090")],
            network="10GbE",
        ),
        Cluster(
            "2x L4 + A100-40 cloud VMs, 25GbE",
            [gpu("l4a", "L4"), gpu("l4b", "L4"), gpu("a100", "A100-40")],
            network="25GbE",
        ),
        Cluster(
            "4x T4 (PCIe) + A100-80, 10GbE",
            [*node_gpus("t4", *["T4"] * 4, link="pcie_host"), gpu("a100", "A100-80")],
            network="10GbE",
        ),
        Cluster(
            "H100 PCIe + M2 Ultra 192, 10GbE",
            [gpu("ws", "H100-PCIe"), mac("studio", "M2 Ultra", 192)],
            network="10GbE",
        ),
        Cluster(
            "shared A100-80 busy 80% + idle A100-40, 25GbE",
            [gpu("shared", "A100-80", used_gib=30.0, util=80), gpu("spare", "A100-40")],
            network="25GbE",
        ),
        Cluster(
            "H100 + A100-80 + EPYC 9004 512 GB CPU server, 100GbE",
            [gpu("h100", "H100"), gpu("a100", "A100-80"), cpu("epyc", "EPYC 9004", used_gib=16)],
            network="100GbE",
        ),
        Cluster(
            "2x RTX 6000 Ada workstation (PCIe) + A100-80, 10GbE",
            [*node_gpus("ws", "6000ada", "6000ada", link="pcie_p2p"), gpu("a100", "A100-80")],
            network="10GbE",
        ),
        Cluster(
            "H200 + M2 Ultra 192 + 2x 4090 PC, 10GbE",
            [
                gpu("h200", "H200"),
                mac("studio", "M2 Ultra", 192),
                *peered([gpu("rig", "4090", 0, used_gib=1.0), gpu("rig", "4090", 1)], "pcie_host"),
            ],
            network="10GbE",
        ),
        Cluster(
            "8x L4 node + 2x A100-80 NVLink, 25GbE",
            [
                *node_gpus("l4", *["L4"] * 8, link="pcie_host"),
                *node_gpus("a100", "A100-80", "A100-80", link="nvlink"),
            ],
            network="25GbE",
        ),
        Cluster(
            "2x 4090 PC (PCIe) + H100 PCIe node, 10GbE",
            [*node_gpus("rig", "4090", "4090", link="pcie_host"), gpu("ws", "H100-PCIe")],
            network="10GbE",
        ),
        # --- mixed ---
        Cluster(
            "M2 Ultra 192 + 4090 + 3090 + 3060, 1GbE",
            [
                mac("studio", "M2 Ultra", 192),
                gpu("gamer", "4090", used_gib=1.2),
                gpu("study", "3090"),
                gpu("den", "3060"),
            ],
        ),
        Cluster(
            "hackathon: 3 MacBooks on Wi-Fi + 4090 PC",
            [
                mac("mbp1", "M3 Max", 128, used_gib=16, battery=62),
                mac("mbp2", "M2 Max", 96, used_gib=14, temp_c=96, throttle_c=95),
                mac("mbp3", "M3 Max 30c", 36, used_gib=12),
                gpu("gamer", "4090", used_gib=1.2),
            ],
            uplinks={"mbp1": "Wi-Fi", "mbp2": "Wi-Fi", "mbp3": "Wi-Fi"},
        ),
        Cluster(
            "office laptops on Wi-Fi: 4090L, 3080L, M3 Max 48, Air 16",
            [
                gpu("l1", "4090L", used_gib=1.5, temp_c=83, throttle_c=87),
                gpu("l2", "3080L", used_gib=1.5, battery=80),
                mac("l3", "M3 Max", 48, used_gib=14),
                mac("l4", "M2", 16, used_gib=7, battery=45),
            ],
            network="Wi-Fi",
        ),
        Cluster(
            "CPU only: DDR4 + DDR5 desktops + EPYC 7003 256 GB, 10GbE",
            [
                cpu("old", "DDR4 desktop"),
                cpu("new", "DDR5 desktop"),
                cpu("server", "EPYC 7003", used_gib=12),
            ],
            network="10GbE",
        ),
        Cluster(
            "CPU only: old Xeon 256 GB (4ch DDR4) + DDR5 desktop, 10GbE",
            [cpu("xeon", "Xeon E5 v4", used_gib=10), cpu("new", "DDR5 desktop")],
            network="10GbE",
        ),
        Cluster(
            "3060 + 2 CPU nodes (DDR4, DDR5), 1GbE",
            [gpu("den", "3060"), cpu("old", "DDR4 desktop"), cpu("new", "DDR5 desktop")],
        ),
        Cluster(
            "everything: A100-40 + 3090 + M2 Max 64 + DDR4 CPU, 1GbE",
            [
                gpu("lab", "A100-40"),
                gpu("study", "3090"),
                mac("mbp", "M2 Max", 64, used_gib=10),
                cpu("nas", "DDR4 desktop"),
            ],
        ),
    ]


MODEL_IDS: dict[str, str] = {
    "8B": "Llama-3.1-8B-Instruct-4bit",
    "70B": "Llama-3.1-70B-Instruct-4bit",
    "405B": "Llama-3.1-405B-Instruct-4bit",
}


def scenarios(cards: dict[str, ModelCard]) -> list[Scenario]:
    """Every cluster × every model in ``cards`` (the caller skips those where nothing fits)."""
    suite: list[Scenario] = []
    for cluster in clusters():
        links = cluster.links()
        for key, card in cards.items():
            suite.append(Scenario(cluster.name, key, card, cluster.devices, links))
    return suite


# --- random mixes (solve time) ---------------------------------------------------------------
_SINGLE = ["4090", "3090", "3060", "4080", "A100-80", "H100-PCIe", "L4", "T4"]
_LAPTOPS = ["4090L", "3080L"]
_MACS = [("M2 Max", 64.0), ("M2 Ultra", 192.0), ("M3 Max", 128.0), ("M2 Pro", 32.0)]
_CPUS = ["DDR4 desktop", "DDR5 desktop"]


def random_mix(count: int, seed: int) -> list[PlacementDevice]:
    """``count`` devices on about ``count × 2/3`` nodes: single-GPU PCs, laptops, Macs,
    CPU nodes and multi-GPU nodes (2 or 4 GPUs); about 10 % throttle, 20 % are busy,
    some laptops run on battery, free memory varies."""
    rng = random.Random(seed)
    devices: list[PlacementDevice] = []
    node_number = 0
    while len(devices) < count:
        node = f"node{node_number:03d}"
        node_number += 1
        left = count - len(devices)
        util = rng.choice([0.0, 0.0, 0.0, 0.0, 30.0, 60.0]) if rng.random() < 0.3 else 0.0
        hot = rng.random() < 0.1
        roll = rng.random()
        if roll < 0.15 and left >= 2:
            per_node = 4 if left >= 4 and rng.random() < 0.4 else 2
            key = rng.choice(["3090", "A100-80", "H100", "L4"])
            kind: PeerLinkKind = "nvlink" if key in ("A100-80", "H100") else "pcie_host"
            devices.extend(node_gpus(node, *[key] * per_node, link=kind))
        elif roll < 0.55:
            key = rng.choice(_SINGLE)
            used = CATALOG[key].memory_gib * rng.choice([0.02, 0.1, 0.3])
            devices.append(
                gpu(node, key, used_gib=used, util=util, temp_c=92 if hot else 60, throttling=hot)
            )
        elif roll < 0.65:
            devices.append(
                gpu(
                    node,
                    rng.choice(_LAPTOPS),
                    used_gib=1.0,
                    temp_c=92 if hot else 70,
                    throttle_c=87,
                    throttling=hot,
                    battery=rng.choice([None, None, 70.0, 30.0]),
                )
            )
        elif roll < 0.9:
            chip, memory = rng.choice(_MACS)
            devices.append(
                mac(node, chip, memory, used_gib=rng.choice([6.0, 10.0, 20.0]), util=util)
            )
        else:
            devices.append(cpu(node, rng.choice(_CPUS)))
    return devices


def random_links(devices: list[PlacementDevice], seed: int) -> Links:
    """Measured links for a random mix: each node on 10GbE, 1GbE or Wi-Fi (seeded)."""
    rng = random.Random(seed)
    nodes = sorted({str(device.node_id) for device in devices})
    uplinks = {node: rng.choice(["10GbE", "10GbE", "1GbE", "1GbE", "Wi-Fi"]) for node in nodes}
    return Cluster("random", devices, uplinks=uplinks).links()
