"""Models: cards for placement, loaders for the weights."""
