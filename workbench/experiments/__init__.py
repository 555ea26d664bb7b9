"""The computations each notebook shows, returning plain data; usable without Jupyter."""
