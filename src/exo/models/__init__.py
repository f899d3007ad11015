"""Models: cards for placement; MLX model directories (GGUF imported into one) loaded as
pipeline stages through mlx-lm.

exo never downloads a model: every exo process keeps the Hugging Face hub offline, so
loading a tokenizer or config from a local directory can never reach the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
