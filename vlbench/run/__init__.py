"""Running: the matrix of defenses × attacks × datasets, its plan, checkpoint reuse, provenance and run loop (`matrix`)."""
