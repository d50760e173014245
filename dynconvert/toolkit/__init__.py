"""What the strategies build on: tracing, costs, training, calibration, checkpoints, distribution, data."""
