"""Feature model of the synthetic benchmark: CLIP-like snippet embeddings for a planned video.

A snippet sums a shared CLIP direction, a scene, a video and a shot background, AR(1) noise (partly
inside the anomaly subspace), soft-edged class events and anomaly-like "hard negative" bursts, and
is rescaled to a CLIP-like norm; crops add a small static and low-rank shift. See `synth.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.signal import lfilter

from dsanet.datasets import DatasetSpec
from dsanet.synth_layout import VideoPlan


@dataclass(frozen=True)
class FeatureModel:
    params: dict[str, Any]  # the merged `model` entries of synth.yaml
    class_labels: tuple[str, ...]  # row order of `prototypes`
    common: np.ndarray  # (D,) direction every embedding shares
    scenes: np.ndarray  # (S, D)
    scene_probs: np.ndarray  # (C, S) P(scene | class) for an anomalous video; row 0 normal
    prototypes: np.ndarray  # (C, D) class event directions; row 0 unused
    confusers: np.ndarray  # (Q, D) hard-negative event directions
    crop_basis: np.ndarray  # (R, D) subspace of the per-snippet crop noise
    semantic: np.ndarray  # (K, D) anomaly, group, class and confuser axes


def model_params(dataset: str, calibration: dict[str, Any]) -> dict[str, Any]:
    """Shared `model` entries overridden by the dataset's own `model` entries."""
    return {**calibration["model"], **calibration["datasets"][dataset]["model"]}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build_feature_model(
    spec: DatasetSpec, params: dict[str, Any], rng: np.random.Generator
) -> FeatureModel:
    """Draw the fixed directions: orthonormal, so the mixing weights are exact cosines."""
    groups: dict[str, list[str]] = params["groups"]
    grouped = sorted(c for members in groups.values() for c in members)
    if grouped != sorted(spec.class_labels[1:]):
        raise ValueError(
            f"synth.yaml model.groups of {spec.name!r} must list every anomaly class once; "
            f"got {grouped}, expected {sorted(spec.class_labels[1:])}"
        )
    n_classes, n_groups, n_scenes = spec.num_classes, len(groups), params["n_scenes"]
    n_conf, rank = len(params["confusers"]), params["crop_rank"]
    sizes = [1, n_scenes, 1, n_groups, n_classes, n_conf, rank]
    if sum(sizes) > params["dim"]:
        raise ValueError(f"synth.yaml model.dim={params['dim']} is too small for {sum(sizes)} axes")
    basis = np.linalg.qr(rng.standard_normal((params["dim"], sum(sizes))))[0].T
    common, scenes, anomaly, group_axes, class_axes, conf_axes, crop_basis = np.split(
        basis, np.cumsum(sizes)[:-1]
    )
    index = {label: i for i, label in enumerate(spec.class_labels)}
    group_of = {index[c]: g for g, members in enumerate(groups.values()) for c in members}
    w = params["prototype"]
    prototypes = np.zeros((n_classes, params["dim"]))
    for c, g in group_of.items():
        mix = w["anomaly"] * anomaly[0] + w["group"] * group_axes[g] + w["own"] * class_axes[c]
        prototypes[c] = _unit(mix)
    wq = params["confuser"]
    confusers = np.stack(
        [
            _unit(
                wq["anomaly"] * anomaly[0]
                + wq["group"] * group_axes[group_of[index[near]]]
                + wq["own_class"] * class_axes[index[near]]
                + wq["own"] * conf_axes[q]
            )
            for q, near in enumerate(params["confusers"].values())
        ]
    )
    # Each group films in a few "home" scenes (streets for riots, roads for accidents), so the
    # scene predicts the class at the video level but says nothing about when the event happens.
    scene_probs = np.full((n_classes, n_scenes), 1.0 / n_scenes)
    homes = [rng.choice(n_scenes, params["home_scenes"], replace=False) for _ in groups]
    for c, g in group_of.items():
        scene_probs[c] *= 1 - params["scene_affinity"]
        scene_probs[c, homes[g]] += params["scene_affinity"] / params["home_scenes"]
    return FeatureModel(
        params,
        spec.class_labels,
        common[0],
        scenes,
        scene_probs,
        prototypes,
        confusers,
        crop_basis.astype(np.float32),
        np.concatenate([anomaly, group_axes, class_axes[1:], conf_axes]),
    )


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Unit-variance AR(1) noise along axis 0."""
    e = rng.standard_normal(shape, dtype=np.float32)
    e[0] /= np.sqrt(1 - rho**2)  # start in the stationary distribution
    return lfilter([np.sqrt(1 - rho**2)], [1.0, -rho], e, axis=0).astype(np.float32)


def _envelope(
    start: float, end: float, length: int, ramp: int, frames_per_snippet: int
) -> np.ndarray:
    """(T,) share of each snippet's frames inside [start, end), smoothed by a triangular ramp."""
    edges = np.arange(length + 1) * frames_per_snippet
    cover = np.clip(np.minimum(end, edges[1:]) - np.maximum(start, edges[:-1]), 0, None)
    kernel = ramp + 1 - np.abs(np.arange(-ramp, ramp + 1))
    smooth = np.convolve(cover / frames_per_snippet, kernel / kernel.sum())  # (T + 2 ramp,)
    return smooth[ramp : ramp + length]


def _hard_negatives(
    model: FeatureModel, plan: VideoPlan, frames_per_snippet: int, rng: np.random.Generator
) -> list[tuple[float, float, np.ndarray, list[float]]]:
    """Confuser bursts (start, end in frames, direction, amplitude range) for one video."""
    p, length = model.params, plan.length
    if rng.random() >= p["hard_negative_share"]["normal" if plan.is_normal else "anomalous"]:
        return []
    low, high = p["hard_negatives_per_video"]
    bursts = []
    for _ in range(int(rng.integers(low, high + 1))):
        span = np.exp(rng.uniform(np.log(2), np.log(max(3.0, 0.4 * length))))  # snippets
        start = rng.uniform(-0.5 * span, length - 0.5 * span) * frames_per_snippet
        confuser = model.confusers[int(rng.integers(len(model.confusers)))]
        end = start + span * frames_per_snippet
        bursts.append((start, end, confuser, p["hard_negative_amplitude"]))
    return bursts


def render_video(
    model: FeatureModel, plan: VideoPlan, frames_per_snippet: int, rng: np.random.Generator
) -> np.ndarray:
    """(T, D) float32 underlying signal of one video, before crops and norm rescaling."""
    p, length = model.params, plan.length
    dim, n_axes = model.common.shape[0], len(model.semantic)
    scene_class = 0 if plan.is_normal else int(rng.choice(plan.classes))
    scene = int(rng.choice(len(model.scenes), p=model.scene_probs[scene_class]))
    x = p["noise"] / np.sqrt(dim) * _ar1(rng, (length, dim), p["noise_rho"])  # (T, D)
    x = x + p["common"] * model.common + p["scene"] * model.scenes[scene]
    x += p["video"] * _unit(rng.standard_normal(dim))
    # Each cut redraws the shot background; part of it lies in the semantic (anomaly) subspace,
    # so a fixed projection sees shot-to-shot swings a learned scorer must see through.
    cuts = np.zeros(length, dtype=int)  # (T,) shot index
    if p["shot_mean"] > 0:
        cuts = np.cumsum(rng.random(length) < 1.0 / p["shot_mean"])
    n_shots = int(cuts[-1]) + 1
    shots = p["shot"] * _unit(rng.standard_normal((n_shots, dim)))  # (shots, D)
    z = rng.standard_normal((n_shots, n_axes))  # (shots, K)
    shots += (p["semantic_nuisance"] / np.sqrt(n_axes)) * z @ model.semantic
    x += shots[cuts]
    # Fast noise in the same subspace: single snippets mislead, a few in a row rarely do.
    z = _ar1(rng, (length, n_axes), p["semantic_noise_rho"])  # (T, K)
    x += (p["semantic_noise"] / np.sqrt(n_axes)) * z @ model.semantic
    index = {label: i for i, label in enumerate(model.class_labels)}
    events = [
        (s.start, s.end, model.prototypes[index[s.label]], p["event_amplitude"])
        for s in plan.segments
    ]
    for start, end, direction, amplitude in events + _hard_negatives(
        model, plan, frames_per_snippet, rng
    ):
        ramp = int(rng.integers(p["ramp"][0], p["ramp"][1] + 1))
        env = _envelope(start, end, length, ramp, frames_per_snippet)  # (T,)
        wobble = np.clip(1 + p["event_wobble"] * _ar1(rng, (length,), 0.9), 0, None)
        direction = direction + p["event_jitter"] * _unit(rng.standard_normal(dim))
        x += np.outer(rng.uniform(*amplitude) * env * wobble, direction)
    return x.astype(np.float32)


def render_crops(
    model: FeatureModel, signal: np.ndarray, rngs: list[np.random.Generator]
) -> np.ndarray:
    """(N, T, D) float32 crops of `signal`, one per generator: a static shift and low-rank
    per-snippet noise, then per-snippet rescaling to CLIP-like norms."""
    p = model.params
    length, dim = signal.shape
    rank = model.crop_basis.shape[0]
    offsets = np.stack([_unit(rng.standard_normal(dim)) for rng in rngs])  # (N, D)
    z = np.stack([rng.standard_normal((length, rank), dtype=np.float32) for rng in rngs])
    jitter = np.stack([rng.standard_normal((length, 1), dtype=np.float32) for rng in rngs])
    basis = (p["crop_noise"] / np.sqrt(rank) * model.crop_basis).astype(np.float32)
    x = (z.reshape(-1, rank) @ basis).reshape(len(rngs), length, dim)  # (N, T, D)
    x += signal
    x += (p["crop_offset"] * offsets[:, None, :]).astype(np.float32)
    norm = (p["norm"] * (1 + p["norm_jitter"] * jitter)).astype(np.float32)
    x *= norm / np.linalg.norm(x, axis=2, keepdims=True)
    assert x.dtype == np.float32, x.dtype
    return x
