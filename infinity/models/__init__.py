"""Models shipped with infinity for its main job, tests and benchmarks."""
