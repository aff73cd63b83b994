"""Histogram equalisation + normalisation of HU cubes, fitted on the training folds only.

The original CT-GAN pickles its equaliser (``equalization.pkl``) and stores ``(mean, min, max)``
in a ``.npy``. Here both live in one ``normaliser.npz`` (numeric arrays only, loaded with
``allow_pickle=False``) with a human-readable ``normaliser.json`` summary beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lungct.errors import LungCTError
from lungct.fileio import atomic_path, write_json_atomic


class CubeNormaliser:
    """Maps HU to the generator's range and back: equalise (CDF), then ``(e - mean) / (max - min)``.

    ``transform`` gives values of about ``[-0.5, 0.5]`` for training-like cubes; ``inverse``
    clips to that range first (the code's "boundary overflow" fix) and maps back to HU.

    Args:
        bin_centres: increasing HU values of the histogram bins.
        cdf: the cumulative distribution at each bin centre, strictly increasing in ``(0, 1]``.
        mean: mean of the equalised training values.
        low: smallest equalised training value.
        high: largest equalised training value.

    Example:
        >>> hu = np.random.default_rng(0).normal(-700, 200, (4, 8, 8, 8))
        >>> norm = CubeNormaliser.fit(hu, bins=256)
        >>> back = norm.inverse(norm.transform(hu))
        >>> float(np.abs(back - hu).max()) < 20.0
        True

    Reference:
        Mirsky et al. "CT-GAN". USENIX Security 2019 (``utils/equalizer.py`` of the code).
    """

    def __init__(
        self, bin_centres: np.ndarray, cdf: np.ndarray, mean: float, low: float, high: float
    ) -> None:
        self.bin_centres = np.asarray(bin_centres, dtype=np.float64)
        self.cdf = np.asarray(cdf, dtype=np.float64)
        self.mean = float(mean)
        self.low = float(low)
        self.high = float(high)
        if self.bin_centres.ndim != 1 or self.bin_centres.shape != self.cdf.shape:
            raise LungCTError(None, "normaliser: bins and CDF must be 1-D of equal length")
        if not (np.all(np.diff(self.bin_centres) > 0) and np.all(np.diff(self.cdf) > 0)):
            raise LungCTError(None, "normaliser: bins and CDF must be strictly increasing")
        if not self.high > self.low:
            raise LungCTError(None, "normaliser: empty equalised range")

    @classmethod
    def fit(cls, cubes_hu: np.ndarray, bins: int = 10000) -> CubeNormaliser:
        """Fit on HU values (any shape), e.g. the central cubes of the training set."""
        values = np.asarray(cubes_hu, dtype=np.float64).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise LungCTError(None, "normaliser: no (finite) training values to fit on")
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
        hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
        centres = 0.5 * (edges[:-1] + edges[1:])
        # A tiny floor per bin keeps the CDF strictly increasing, so it can be inverted.
        counts = hist.astype(np.float64) + 1e-6 * values.size / bins
        cdf = np.cumsum(counts) / counts.sum()
        equalised = np.interp(values, centres, cdf)
        return cls(centres, cdf, equalised.mean(), equalised.min(), equalised.max())

    def equalise(self, hu: np.ndarray) -> np.ndarray:
        """HU -> CDF value in ``[0, 1]``."""
        return np.interp(np.asarray(hu, dtype=np.float64), self.bin_centres, self.cdf)

    def transform(self, hu: np.ndarray) -> np.ndarray:
        """HU -> normalised float32 (about ``[-0.5, 0.5]``)."""
        e = self.equalise(hu)
        return ((e - self.mean) / (self.high - self.low)).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Normalised values (clipped to ``[-0.5, 0.5]``) -> HU as float32."""
        x = np.clip(np.asarray(x, dtype=np.float64), -0.5, 0.5)
        e = x * (self.high - self.low) + self.mean
        return np.interp(e, self.cdf, self.bin_centres).astype(np.float32)

    def summary(self) -> dict:
        """What ``normaliser.json`` holds: the fitted numbers a person may want to see."""
        pct = {
            f"hu_at_cdf_{q:g}": round(float(np.interp(q, self.cdf, self.bin_centres)), 1)
            for q in (0.01, 0.25, 0.5, 0.75, 0.99)
        }
        return {
            "kind": "histogram equalisation + (e - mean) / (max - min)",
            "bins": int(self.bin_centres.size),
            "hu_range": [float(self.bin_centres[0]), float(self.bin_centres[-1])],
            "equalised_mean": self.mean,
            "equalised_min": self.low,
            "equalised_max": self.high,
            **pct,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (``.npz``, numeric arrays only) and a ``.json`` summary beside it."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                bin_centres=self.bin_centres,
                cdf=self.cdf,
                stats=np.asarray([self.mean, self.low, self.high]),
            )
        write_json_atomic(path.with_suffix(".json"), self.summary())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CubeNormaliser:
        """Read a file written by :meth:`save` (never unpickles anything)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                mean, low, high = (float(v) for v in data["stats"])
                return cls(data["bin_centres"], data["cdf"], mean, low, high)
        except FileNotFoundError:
            raise LungCTError(path, "normaliser file not found") from None
        except (OSError, ValueError, KeyError) as exc:
            raise LungCTError(path, f"broken normaliser file ({exc})") from None
