"""What a node knows about itself, gathered with psutil."""

import platform
import socket

import psutil

from exo.shared.types.node import NetworkInterface, NodeStaticInfo


def gather_static_info(
    friendly_name: str | None, api_port: int | None, ring_port: int | None = None
) -> NodeStaticInfo:
    hostname = socket.gethostname()
    interfaces = [
        NetworkInterface(
            name=name,
            addresses=[
                address.address
                for address in addresses
                if address.family in (socket.AF_INET, socket.AF_INET6)
            ],
        )
        for name, addresses in sorted(psutil.net_if_addrs().items())
    ]
    return NodeStaticInfo(
        friendly_name=friendly_name or hostname,
        hostname=hostname,
        os=f"{platform.system()} {platform.release()}",
        cpu_count=psutil.cpu_count() or 1,
        ram_total_bytes=psutil.virtual_memory().total,
        network_interfaces=interfaces,
        api_port=api_port,
        ring_port=ring_port,
    )


def available_ram_bytes() -> int:
    return psutil.virtual_memory().available


def memory_changed_meaningfully(previous: int, current: int, total: int) -> bool:
    """True when available RAM moved by at least 1 % of the total."""
    return abs(current - previous) >= max(1, total // 100)
