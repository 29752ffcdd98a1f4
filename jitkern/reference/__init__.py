"""Float64 PyTorch references of every op, for tests and users."""
