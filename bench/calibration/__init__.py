"""Calibration: profilers run on a GPU (or the CPU engine) and the step-time tables they wrote."""
