"""Hyperparameter search over DSANet configs: Ray Tune + Optuna + ASHA, tracked in MLflow.

`tune.space` reads search-space YAML without importing Ray; only `tune.run` and `tune.trainable`
import it.
"""
