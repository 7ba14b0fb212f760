"""Smooth random fields: low-frequency cosine fields over the field of view, and local filtered noise.

Both are defined in millimetres, not voxels, so a case drawn at 1 mm and at 3 mm shows the same
shapes: only the sampling grid changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def random_cosine_coefficients(rng: np.random.Generator, order: int, rms: float, with_mean: bool) -> np.ndarray:
    """Coefficients ``[order, order, order]`` of a random cosine field whose RMS over the volume is ``rms``.

    Amplitudes fall as 1/(1 + k² + l² + m²) so low frequencies dominate; ``with_mean=False`` drops
    the constant term (for displacements, whose mean is a separate translation).
    """
    k = np.arange(order)
    kk = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    coef = rng.standard_normal((order, order, order)) / (1.0 + kk)
    if not with_mean:
        coef[0, 0, 0] = 0.0
    # mean square of prod cos(pi k u) over [0, 1]^3: 1 for k = 0, 1/2 otherwise, per axis
    w = np.where(k == 0, 1.0, 0.5)
    power = float(np.sum(coef**2 * w[:, None, None] * w[None, :, None] * w[None, None, :]))
    return coef * (rms / np.sqrt(max(power, 1e-12)))


def cosine_field(coef: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Evaluate ``sum_klm coef[k,l,m] cos(pi k u) cos(pi l v) cos(pi m w)`` on a grid → float32 ``shape``.

    ``u, v, w`` are voxel-centre coordinates normalised to [0, 1] over each axis of the field of view.
    Contracted axis by axis with plain einsum (no BLAS), so the result is bit-identical whatever
    the thread settings of the process.
    """
    bases = []
    for n in shape:
        u = (np.arange(n) + 0.5) / n
        bases.append(np.cos(np.pi * u[:, None] * np.arange(coef.shape[0])[None, :]))
    bx, by, bz = bases
    klz = np.einsum("klm,zm->klz", coef, bz)
    kyz = np.einsum("klz,yl->kyz", klz, by).astype(np.float32)
    field = np.zeros(shape, dtype=np.float32)
    for k in range(coef.shape[0]):
        field += bx[:, k].astype(np.float32)[:, None, None] * kyz[k][None]
    return field


@dataclass(frozen=True)
class LocalNoise:
    """A smooth, unit-variance random field on a cube of world space (mm), evaluated by interpolation.

    ``grid`` ``[N, N, N]`` samples the cube ``origin + step * index``; outside the cube the field is 0.
    """

    grid: np.ndarray
    origin: np.ndarray
    step: float

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Field values at world points ``[3, P]`` (mm) → ``[P]`` float32."""
        index = (points - self.origin[:, None].astype(np.float32)) / np.float32(self.step)
        return ndimage.map_coordinates(self.grid, index, order=1, mode="constant", cval=0.0, prefilter=False)


def local_noise(
    rng: np.random.Generator, centre: np.ndarray, half_width: float, correlation_mm: float
) -> LocalNoise:
    """Gaussian-filtered white noise on a cube of ``±half_width`` mm around ``centre`` ``[3]``.

    The grid step is half of ``correlation_mm`` (the filter's sigma), so the field is smooth at
    any output spacing; it is rescaled to unit standard deviation.
    """
    step = max(correlation_mm / 2.0, 0.5)
    n = int(np.ceil(2 * half_width / step)) + 1
    white = rng.standard_normal((n, n, n), dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, sigma=correlation_mm / step, mode="wrap", truncate=3.0)
    smooth /= max(float(smooth.std()), 1e-6)
    origin = np.asarray(centre, dtype=np.float64) - half_width
    return LocalNoise(grid=smooth, origin=origin, step=step)
