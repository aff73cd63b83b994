"""How real do injected nodules look? The AUC of classifiers that try to tell them apart.

Two adversaries, both trained on cubes from the TRAINING folds and scored on cubes from held-out
folds (0.5 = indistinguishable, 1.0 = always told apart):

* ``logistic``: logistic regression on :func:`cube_features` (intensity histogram and radial
  profile of the centre, edge sharpness, fine-scale noise inside and around the nodule - the
  traces pasting would leave);
* ``cnn``: a small 3-D CNN on the windowed central ``crop``^3 voxels, with flip and rotation
  augmentation.

Cubes are 1 mm HU cubes cut the same way for both classes (:func:`ct_gan_augment.paste.cut_cube`
at the annotated or injected centre).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy import ndimage

HIST_EDGES = (-1000, -800, -600, -400, -200, 0, 200, 400)
SHELLS_MM = (0, 2, 4, 6, 8, 11, 16)


def cube_features(cubes_hu: np.ndarray, centre_size: int = 16) -> np.ndarray:
    """``(N, F)`` hand-made features of ``(N, c, c, c)`` HU cubes (see the module docstring)."""
    cubes = np.asarray(cubes_hu, dtype=np.float32)
    n, c = cubes.shape[0], cubes.shape[1]
    grid = np.indices((c, c, c)).astype(np.float32) - (c - 1) / 2.0
    radius = np.sqrt(np.sum(grid**2, axis=0))
    lo = (c - centre_size) // 2
    centre = (slice(lo, lo + centre_size),) * 3
    out = []
    for cube in cubes:
        core = cube[centre]
        hist = np.histogram(np.clip(core, -1000, 400), bins=HIST_EDGES)[0] / core.size
        stats = [*np.percentile(core, [10, 50, 90]).tolist(), core.mean(), core.std()]
        grad = ndimage.gaussian_gradient_magnitude(cube, 1.0)[centre]
        residual = cube - ndimage.gaussian_filter(cube, 1.0)
        inner = radius <= centre_size / 2
        profile = [
            cube[(radius >= a) & (radius < b)].mean() for a, b in itertools.pairwise(SHELLS_MM)
        ]
        noise_in = residual[inner].std()
        noise_out = residual[~inner].std()
        out.append(
            [
                *hist,
                *stats,
                grad.mean(),
                grad.std(),
                np.percentile(grad, 90),
                noise_in,
                noise_out,
                noise_in / (noise_out + 1e-3),
                *profile,
            ]
        )
    return np.asarray(out, dtype=np.float64).reshape(n, -1)


def bootstrap_auc(
    labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of the AUC over cube-level bootstrap resamples."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels), np.asarray(scores)
    values = []
    for _ in range(resamples):
        i = rng.integers(0, len(labels), len(labels))
        if labels[i].min() != labels[i].max():
            values.append(roc_auc_score(labels[i], scores[i]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _logistic_scores(train_x, train_y, test_x) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
    )
    model.fit(train_x, train_y)
    return model.predict_proba(test_x)[:, 1]


def _window(cubes: np.ndarray, crop: int) -> np.ndarray:
    c = cubes.shape[1]
    lo = (c - crop) // 2
    sl = slice(lo, lo + crop)
    x = np.clip((cubes[:, sl, sl, sl] + 1000.0) / 1400.0, 0.0, 1.0)
    return x[..., None].astype(np.float32)


def _cnn_scores(train_cubes, train_y, test_cubes, crop: int, epochs: int, seed: int) -> np.ndarray:
    import keras

    keras.utils.set_random_seed(seed)
    x = _window(train_cubes, crop)
    y = np.asarray(train_y, dtype=np.float32)
    inputs = keras.Input((crop, crop, crop, 1))
    h = inputs
    for filters in (8, 16, 32):
        h = keras.layers.Conv3D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling3D(2)(h)
    h = keras.layers.GlobalAveragePooling3D()(h)
    h = keras.layers.Dropout(0.3)(h)
    outputs = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inputs, outputs, name="realism_cnn")
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    rng = np.random.default_rng(seed)
    pos = max(1.0, float(y.sum()))
    neg = max(1.0, float(len(y) - y.sum()))
    weights = np.where(y > 0.5, 0.5 * len(y) / pos, 0.5 * len(y) / neg).astype(np.float32)
    for _ in range(epochs):
        # Flips and axial quarter turns: the classifier must not learn orientation.
        aug = x.copy()
        for i in range(len(aug)):
            for axis in (0, 1, 2):
                if rng.random() < 0.5:
                    aug[i] = np.flip(aug[i], axis)
            aug[i] = np.rot90(aug[i], int(rng.integers(4)), axes=(1, 2))
        model.fit(aug, y, sample_weight=weights, batch_size=16, epochs=1, verbose=0, shuffle=True)
    return model.predict(_window(test_cubes, crop), verbose=0)[:, 0]


def realism_auc(
    train_real: np.ndarray,
    train_fake: np.ndarray,
    test_real: np.ndarray,
    test_fake: np.ndarray,
    methods: tuple[str, ...] = ("logistic", "cnn"),
    crop: int = 24,
    epochs: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Train each adversary on training-fold cubes, report its held-out AUC (real = 0, fake = 1).

    Returns:
        ``{method: {"auc", "ci95", "n_train", "n_test"}}``.
    """
    from sklearn.metrics import roc_auc_score

    train_y = np.r_[np.zeros(len(train_real)), np.ones(len(train_fake))]
    test_y = np.r_[np.zeros(len(test_real)), np.ones(len(test_fake))]
    train_cubes = np.concatenate([train_real, train_fake]).astype(np.float32)
    test_cubes = np.concatenate([test_real, test_fake]).astype(np.float32)
    results: dict[str, Any] = {}
    for method in methods:
        if method == "logistic":
            scores = _logistic_scores(
                cube_features(train_cubes), train_y, cube_features(test_cubes)
            )
        elif method == "cnn":
            scores = _cnn_scores(train_cubes, train_y, test_cubes, crop, epochs, seed)
        else:
            raise ValueError(f"unknown method {method!r}")
        results[method] = {
            "auc": round(float(roc_auc_score(test_y, scores)), 4),
            "ci95": [round(v, 4) for v in bootstrap_auc(test_y, scores, seed=seed)],
            "n_train": [len(train_real), len(train_fake)],
            "n_test": [len(test_real), len(test_fake)],
        }
    return results
