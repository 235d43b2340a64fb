"""Pieces both services use: logging setup and flag helpers."""
