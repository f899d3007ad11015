import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import load_stage
from exo.models.tensor_cache import cached_paths, ensure_cached

# VmHWM (not getrusage's ru_maxrss, which keeps the forking parent's peak across exec).
PEAK_PROBE = """
import sys
from pathlib import Path
from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import load_stage
cache = Path(sys.argv[1]) if sys.argv[1] != "-" else None
stage = load_stage(bundled_gguf_path(), int(sys.argv[2]), int(sys.argv[3]), cache)
status = Path("/proc/self/status").read_text().splitlines()
peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(peak_kib * 1024, stage.nbytes)
"""


def peak_bytes(cache: Path | None, start: int, end: int) -> tuple[int, int]:
    argv = [str(cache) if cache else "-", str(start), str(end)]
    output = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(output[0]), int(output[1])


def test_cached_stage_equals_direct_stage(tmp_path: Path) -> None:
    gguf = bundled_gguf_path()
    ensure_cached(gguf, tmp_path)
    assert all(path.is_file() for path in cached_paths(gguf, tmp_path))
    direct = load_stage(gguf, 10, 20)
    cached = load_stage(gguf, 10, 20, tmp_path)
    assert direct.nbytes == cached.nbytes
    for ours, theirs in zip(direct.arrays(), cached.arrays(), strict=True):
        assert mx.array_equal(ours, theirs).item()
    assert cached.hyperparameters == direct.hyperparameters


def test_a_middle_stage_peaks_at_its_share_not_the_whole_model(tmp_path: Path) -> None:
    ensure_cached(bundled_gguf_path(), tmp_path)
    peak_direct, _ = peak_bytes(None, 10, 20)
    peak_cached, stage_bytes = peak_bytes(tmp_path, 10, 20)
    peak_whole, whole_bytes = peak_bytes(tmp_path, 0, 30)
    assert stage_bytes < whole_bytes / 3
    # Through the cache, a third of the layers costs clearly less than the whole model,
    # and less than the direct path, which reads the whole file.
    assert peak_cached + (whole_bytes - stage_bytes) / 2 < peak_whole
    assert peak_cached < peak_direct
