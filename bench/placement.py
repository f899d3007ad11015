"""Placement benchmark: greedy vs CSP predicted ms/token, and CSP solve time.

    uv run python bench/placement.py [--repeats 30]

Every scenario is placed both ways with the same cost model; the ratio greedy / CSP is the
predicted speed-up. Solve time is measured over repeated solves (p50 / p99) against the
targets: p99 < 10 ms at 16 devices and < 100 ms at 64 devices. Random mixes are seeded.
"""

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import percentile
from exo.master.placement_csp import (
    ConstraintSatisfactionPlacement,
    CostModel,
    PlacementDevice,
    greedy_stages,
)
from exo.models.cards import get_model_card
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.memory import GIB
from exo.shared.types.models import ModelCard

TARGET_P99_MS = {16: 10.0, 64: 100.0}


def dev(
    node: str,
    device_id: str,
    name: str,
    memory_gb: float,
    bandwidth_gbps: float,
    tflops: float,
    *,
    backend: str = "cuda",
    throttling: bool = False,
    temperature_c: float = 55.0,
) -> PlacementDevice:
    return PlacementDevice(
        node_id=NodeId(node),
        device_id=DeviceId(device_id),
        name=name,
        vendor={"cuda": "NVIDIA", "metal": "Apple", "cpu": "cpu"}.get(backend, "unknown"),
        backend=backend,
        memory_total_bytes=int(memory_gb * GIB),
        memory_free_bytes=int(memory_gb * GIB),
        memory_bandwidth_gbps=bandwidth_gbps,
        peak_tflops_fp16=tflops,
        temperature_c=temperature_c,
        is_thermal_throttling=throttling,
        is_cpu_fallback=backend == "cpu",
    )


CATALOG: list[tuple[str, float, float, float, str]] = [
    ("RTX 4090", 24, 1008, 165, "cuda"),
    ("Tesla T4", 16, 320, 65, "cuda"),
    ("A100 80GB", 80, 2039, 312, "cuda"),
    ("RTX 3060", 12, 360, 51, "cuda"),
    ("M2 Max", 32, 400, 27, "metal"),
    ("M2 Ultra", 64, 800, 54, "metal"),
    ("CPU", 32, 40, 1, "cpu"),
]


def random_mix(count: int, seed: int) -> list[PlacementDevice]:
    """``count`` devices on about ``count × 2/3`` nodes (some nodes hold two GPUs)."""
    rng = random.Random(seed)
    devices: list[PlacementDevice] = []
    node = 0
    while len(devices) < count:
        per_node = 2 if rng.random() < 0.5 and len(devices) + 2 <= count else 1
        for slot in range(per_node):
            name, memory, bandwidth, tflops, backend = rng.choice(
                CATALOG[:-1] if per_node == 2 else CATALOG
            )
            hot = rng.random() < 0.1
            devices.append(
                dev(
                    f"node{node:02d}",
                    f"{backend}:{slot}",
                    name,
                    memory * rng.choice([0.6, 0.8, 1.0]),
                    bandwidth,
                    tflops,
                    backend=backend,
                    throttling=hot,
                    temperature_c=92.0 if hot else 60.0,
                )
            )
        node += 1
    return devices


@dataclass
class Scenario:
    name: str
    model: ModelCard
    devices: list[PlacementDevice]


def card(model_id: str) -> ModelCard:
    found = get_model_card(model_id)
    if found is None:
        raise SystemExit(f"unknown model {model_id}")
    return found


def scenarios() -> list[Scenario]:
    llama_8b = card("Llama-3.1-8B-Instruct-4bit")
    llama_70b = card("Llama-3.1-70B-Instruct-4bit")
    llama_405b = card("Llama-3.1-405B-Instruct-4bit")
    suite = [
        Scenario(
            "#2180 CUDA 3060 + CPU node, 8B",
            llama_8b,
            [
                dev("gpu", "cuda:0", "RTX 3060", 12, 360, 51),
                dev("cpu", "cpu", "CPU", 48, 40, 1, backend="cpu"),
            ],
        ),
        Scenario(
            "#2180 CUDA 4090 + CPU node, 70B",
            llama_70b,
            [
                dev("gpu", "cuda:0", "RTX 4090", 24, 1008, 165),
                dev("cpu", "cpu", "CPU", 48, 40, 1, backend="cpu"),
            ],
        ),
        Scenario(
            "Macs 32 GB, 800 vs 400 GB/s, 70B",
            llama_70b,
            [
                dev("mac1", "metal:0", "M2 Ultra", 32, 800, 54, backend="metal"),
                dev("mac2", "metal:0", "M2 Max", 32, 400, 27, backend="metal"),
            ],
        ),
        Scenario(
            "4090 + T4 + A100, 70B",
            llama_70b,
            [
                dev("a", "cuda:0", "RTX 4090", 24, 1008, 165),
                dev("b", "cuda:0", "Tesla T4", 16, 320, 65),
                dev("c", "cuda:0", "A100 40GB", 40, 1555, 312),
            ],
        ),
        Scenario(
            "throttling laptop + 2 desktops, 70B",
            llama_70b,
            [
                dev(
                    "laptop",
                    "cuda:0",
                    "RTX 4090 Laptop",
                    32,
                    576,
                    80,
                    throttling=True,
                    temperature_c=93,
                ),
                dev("desk1", "cuda:0", "RTX 4090", 24, 1008, 165),
                dev("desk2", "cuda:0", "RTX 3090", 24, 936, 71),
            ],
        ),
    ]
    for count, model, seed in [
        (8, llama_70b, 1),
        (16, llama_70b, 2),
        (16, llama_405b, 3),
        (32, llama_405b, 4),
        (64, llama_405b, 5),
        (64, llama_70b, 6),
    ]:
        suite.append(
            Scenario(
                f"random mix {count} devices, {model.model_id.split('-Instruct')[0]}",
                model,
                random_mix(count, seed),
            )
        )
    return suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-ms", type=float, default=100.0)
    arguments = parser.parse_args()
    header = (
        f"{'scenario':<40} {'dev':>3} {'layers':>6} {'greedy ms/tok':>13} {'csp ms/tok':>10} "
        f"{'ratio':>6} {'stages':>6} {'opt':>4} {'p50 ms':>7} {'p99 ms':>7} {'target':>8}"
    )
    print(header)
    print("-" * len(header))
    for scenario in scenarios():
        cost_model = CostModel(model_card=scenario.model)
        greedy = greedy_stages(cost_model, scenario.devices)
        greedy_ms = cost_model.predict_ms_per_token(greedy) if greedy is not None else float("nan")
        timings: list[float] = []
        result = None
        for _ in range(arguments.repeats):
            started = time.perf_counter()
            result = ConstraintSatisfactionPlacement(
                cost_model, scenario.devices, budget_ms=arguments.budget_ms, fallback=greedy
            ).solve()
            timings.append((time.perf_counter() - started) * 1000.0)
        assert result is not None
        csp_ms = result.predicted_ms_per_token or float("nan")
        p50, p99 = percentile(timings, 0.5), percentile(timings, 0.99)
        count = len(scenario.devices)
        target = TARGET_P99_MS.get(count)
        verdict = "" if target is None else ("ok" if p99 < target else "MISSED") + f" <{target:g}"
        optimal = "yes" if result.proven_optimal else ("fb" if result.used_fallback else "no")
        print(
            f"{scenario.name:<40} {count:>3} {scenario.model.n_layers:>6} {greedy_ms:>13.2f} "
            f"{csp_ms:>10.2f} {greedy_ms / csp_ms:>6.2f} {len(result.stages):>6} {optimal:>4} "
            f"{p50:>7.2f} {p99:>7.2f} {verdict:>8}"
        )
    print(
        f"\nratio = greedy / CSP predicted ms per token (higher is better for CSP); "
        f"opt = proven optimal; {arguments.repeats} solves per scenario, budget {arguments.budget_ms:g} ms"
    )


if __name__ == "__main__":
    main()
