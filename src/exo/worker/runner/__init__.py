"""Runner processes: each loads one layer range of a model with MLX and runs it."""
