"""Keras ImageDataGenerator-equivalent augmentation: one affine warp per image, then a flip.

Recipe (../shared/seed-attempts.md, and keras ``ImageDataGenerator.get_random_transform`` /
``apply_affine_transform``): per image draw a rotation angle theta uniform in
[-r, r] degrees, a row (vertical) and a column (horizontal) shift each uniform
in [-s, s] times the image height / width, and two zoom factors (rows,
columns) each uniform in [1-z, 1+z], independently. The output pixel at
(row, col) samples the source at::

    [src_row, src_col, 1] = C @ R(theta) @ T(shift) @ Z(zoom) @ C^-1 @ [row, col, 1]

with C the translation to the image centre ((H-1)/2, (W-1)/2), so a zoom factor
above 1 shows more of the scene (zooms out). Sampling is bilinear
(``scipy.ndimage.affine_transform(order=1)``) and positions outside the source
take the nearest edge pixel (``mode='nearest'``), each channel separately, on
the resized image as float 0..255. A horizontal flip (probability 0.5) follows
the warp.

How close to Keras: this is the same matrix, the same scipy call and the same
order of operations that Keras 2's ``apply_affine_transform`` runs for
``fill_mode='nearest'``, so for equal drawn parameters the pixels are equal
(to float rounding; the centre is the current Keras's ``x/2 - 0.5``). The
random numbers come from numpy's Philox generator seeded per image by grain,
not from Keras's global numpy state, so the draws themselves differ.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage as ndi


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transform (config section ``augment``).

    rotation_deg: degrees; shift_fraction: fraction of the image size;
    zoom_fraction: z in [1-z, 1+z]; horizontal_flip: flip with probability 0.5.
    """

    rotation_deg: float = 0.0
    shift_fraction: float = 0.0
    zoom_fraction: float = 0.0
    horizontal_flip: bool = False

    @property
    def warps(self) -> bool:
        """Whether any affine range is non-zero (the warp runs)."""
        return bool(self.rotation_deg or self.shift_fraction or self.zoom_fraction)

    @property
    def active(self) -> bool:
        """Whether augmentation changes anything (warp or flip)."""
        return self.warps or self.horizontal_flip


def affine_matrix(
    rotation_deg: float,
    shift_rows: float,
    shift_cols: float,
    zoom_rows: float,
    zoom_cols: float,
    height: int,
    width: int,
) -> np.ndarray:
    """Returns ``float64[3, 3]`` mapping output (row, col, 1) to source (row, col, 1).

    Args:
      rotation_deg: rotation angle, degrees.
      shift_rows, shift_cols: shifts in pixels (source = output + shift, before rotation).
      zoom_rows, zoom_cols: zoom factors per axis (> 1 zooms out).
      height, width: image size in pixels; the warp is about ((H-1)/2, (W-1)/2).
    """
    theta = np.deg2rad(rotation_deg)
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]]
    )
    shift = np.array([[1.0, 0.0, shift_rows], [0.0, 1.0, shift_cols], [0.0, 0.0, 1.0]])
    zoom = np.diag([zoom_rows, zoom_cols, 1.0])
    o_r, o_c = height / 2 - 0.5, width / 2 - 0.5
    to_centre = np.array([[1.0, 0.0, o_r], [0.0, 1.0, o_c], [0.0, 0.0, 1.0]])
    from_centre = np.array([[1.0, 0.0, -o_r], [0.0, 1.0, -o_c], [0.0, 0.0, 1.0]])
    return to_centre @ rotation @ shift @ zoom @ from_centre


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Applies `matrix` (see :func:`affine_matrix`) to ``float32[H, W, C]``; bilinear, edge-replicating."""
    channels = [
        ndi.affine_transform(
            image[..., c], matrix[:2, :2], matrix[:2, 2], order=1, mode="nearest", prefilter=False
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def random_augment(image: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Augments one image.

    Args:
      image: ``uint8[H, W, 3]`` (or float) pixels, 0..255, already resized.
      rng: the per-image generator (grain's ``random_map`` seeds it by pipeline seed and index).
      params: the ranges.

    Returns:
      ``float32[H, W, 3]`` in [0, 255]; with all ranges 0 and no flip, the input unchanged.
    """
    out = image.astype(np.float32)
    height, width = out.shape[:2]
    if params.warps:
        r, s, z = params.rotation_deg, params.shift_fraction, params.zoom_fraction
        theta = rng.uniform(-r, r) if r else 0.0
        shift_rows = rng.uniform(-s, s) * height if s else 0.0
        shift_cols = rng.uniform(-s, s) * width if s else 0.0
        zoom_rows, zoom_cols = rng.uniform(1 - z, 1 + z, 2) if z else (1.0, 1.0)
        matrix = affine_matrix(theta, shift_rows, shift_cols, zoom_rows, zoom_cols, height, width)
        out = warp(out, matrix)
    if params.horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
