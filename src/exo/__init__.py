"""exo: heterogeneous-GPU cluster runtime."""
