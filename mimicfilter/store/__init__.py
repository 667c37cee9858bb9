"""Where results live: run directories, the score table's schema, atomic writes, paths (torch-free)."""
