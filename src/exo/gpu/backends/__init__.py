"""One module per backend; each is imported only when the factory needs it."""
