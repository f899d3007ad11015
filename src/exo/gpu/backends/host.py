"""Readings about the host machine that several backends share (battery, CPU temperature)."""

from datetime import UTC, datetime

import psutil
from pydantic import BaseModel, ConfigDict

from exo.shared.types.gpu import NO_BATTERY_PERCENT, UNKNOWN_TEMPERATURE_C

DEFAULT_THROTTLE_THRESHOLD_C = 100.0
"""``thermal_throttle_threshold_c`` when the platform reports none."""

_CPU_SENSOR_GROUPS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "acpitz")


class BatteryReading(BaseModel):
    model_config = ConfigDict(frozen=True)

    percent: float = NO_BATTERY_PERCENT
    is_plugged_in: bool = True


class TemperatureReading(BaseModel):
    model_config = ConfigDict(frozen=True)

    current_c: float = UNKNOWN_TEMPERATURE_C
    throttle_threshold_c: float = DEFAULT_THROTTLE_THRESHOLD_C
    threshold_reported: bool = False


def utc_now() -> datetime:
    return datetime.now(UTC)


def read_battery() -> BatteryReading:
    """The host battery; a machine without one reads as 100 % and plugged in."""
    sensors_battery = getattr(psutil, "sensors_battery", None)
    if sensors_battery is None:
        return BatteryReading()
    try:
        battery = sensors_battery()
    except (OSError, RuntimeError):
        return BatteryReading()
    if battery is None:
        return BatteryReading()
    percent = min(100.0, max(0.0, float(battery.percent)))
    # power_plugged is None when the OS cannot tell; treat unknown as plugged in.
    plugged = battery.power_plugged is not False
    return BatteryReading(percent=percent, is_plugged_in=plugged)


def read_cpu_temperature() -> TemperatureReading:
    """The hottest CPU sensor psutil can see, with its ``high`` mark as the threshold.

    Unknown (no sensors, or a platform without ``sensors_temperatures``) reads as -1 °C.
    """
    sensors_temperatures = getattr(psutil, "sensors_temperatures", None)
    if sensors_temperatures is None:
        return TemperatureReading()
    try:
        groups = sensors_temperatures()
    except (OSError, RuntimeError):
        return TemperatureReading()
    if not groups:
        return TemperatureReading()
    chosen = [groups[name] for name in _CPU_SENSOR_GROUPS if name in groups]
    entries = [entry for group in (chosen or list(groups.values())) for entry in group]
    currents = [float(entry.current) for entry in entries if entry.current is not None]
    if not currents:
        return TemperatureReading()
    highs = [float(entry.high) for entry in entries if entry.high is not None and entry.high > 0]
    if highs:
        return TemperatureReading(
            current_c=max(currents), throttle_threshold_c=min(highs), threshold_reported=True
        )
    return TemperatureReading(current_c=max(currents))
