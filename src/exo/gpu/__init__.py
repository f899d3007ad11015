"""GPU backends (CUDA via NVML, Metal via MLX, CPU via psutil, simulated) and their factory."""
