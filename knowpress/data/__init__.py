"""Data for data-aware stages: calibration text (``calibration.py``)."""
