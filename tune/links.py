"""Kept only for `tune/mlflow_queue.py`, which imports `link_atomic` from here: the function
lives in `dsanet.files`. Delete this module once that import names `dsanet.files`."""

from dsanet.files import link_atomic

__all__ = ["link_atomic"]
