"""Backend selection. NVML is absent on the machines CI uses, so the CPU path is real here."""

import json
from pathlib import Path

import pynvml
import pytest

from exo.gpu.backend import GPUBackend, GPUBackendFactory, is_apple_silicon


def _nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


needs_no_gpu = pytest.mark.skipif(
    _nvml_present() or is_apple_silicon(), reason="this machine has a GPU backend to find"
)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_GPU_BACKEND", raising=False)


@pytest.fixture
def devices_file(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"devices": [{"device_id": "cuda:0", "memory_total_bytes": 1}]}))
    return path


@needs_no_gpu
@pytest.mark.anyio
async def test_auto_without_gpu_is_cpu_without_warnings(logged_warnings: list[str]) -> None:
    backend = await GPUBackendFactory.create_backend()
    assert backend.name == "cpu"
    assert isinstance(backend, GPUBackend)
    assert logged_warnings == []


@needs_no_gpu
@pytest.mark.anyio
@pytest.mark.parametrize("preference", ["cuda", "metal", "CUDA "])
async def test_explicit_backend_without_hardware_falls_back_with_one_warning(
    preference: str, logged_warnings: list[str]
) -> None:
    backend = await GPUBackendFactory.create_backend(preference)
    assert backend.name == "cpu"
    assert len(logged_warnings) == 1
    assert preference.strip().lower() in logged_warnings[0]
    assert "falling back to CPU" in logged_warnings[0]


@pytest.mark.anyio
async def test_explicit_cpu_and_simulated(devices_file: Path) -> None:
    assert (await GPUBackendFactory.create_backend("cpu")).name == "cpu"
    simulated = await GPUBackendFactory.create_backend("simulated", devices_file)
    assert simulated.name == "simulated"
    auto_with_file = await GPUBackendFactory.create_backend("auto", devices_file)
    assert auto_with_file.name == "simulated"


@pytest.mark.anyio
async def test_simulated_without_a_good_file_falls_back(
    tmp_path: Path, logged_warnings: list[str]
) -> None:
    missing = tmp_path / "missing.json"
    backend = await GPUBackendFactory.create_backend("simulated", missing)
    assert backend.name == "cpu"
    assert len(logged_warnings) == 1
    assert str(missing) in logged_warnings[0]
    assert (await GPUBackendFactory.create_backend("simulated")).name == "cpu"


@pytest.mark.anyio
async def test_environment_overrides_auto(
    monkeypatch: pytest.MonkeyPatch, devices_file: Path
) -> None:
    monkeypatch.setenv("EXO_GPU_BACKEND", "simulated")
    assert (await GPUBackendFactory.create_backend("auto", devices_file)).name == "simulated"
    monkeypatch.setenv("EXO_GPU_BACKEND", "cpu")
    assert (await GPUBackendFactory.create_backend("auto", devices_file)).name == "cpu"
    # An explicit preference wins over the environment.
    assert (await GPUBackendFactory.create_backend("simulated", devices_file)).name == "simulated"


@pytest.mark.anyio
async def test_unknown_names_warn_and_auto_detect(
    monkeypatch: pytest.MonkeyPatch, logged_warnings: list[str]
) -> None:
    monkeypatch.setenv("EXO_GPU_BACKEND", "rocm")
    await GPUBackendFactory.create_backend()
    assert len(logged_warnings) == 1
    assert "rocm" in logged_warnings[0]
    monkeypatch.delenv("EXO_GPU_BACKEND")
    await GPUBackendFactory.create_backend("tpu")
    assert len(logged_warnings) == 2
    assert "tpu" in logged_warnings[1]
