"""DSANet for weakly supervised video anomaly detection: config, data, model, training, metrics.

This package never imports Ray, Optuna or MLflow; the search lives in `tune/`.
"""
