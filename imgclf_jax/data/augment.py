"""Per-image augmentation as an ordered list of named ops (config ``augment.ops``); default: Keras's recipe.

The pipeline applies the ops of ``augment.ops`` in order to each training image
(``float32[H, W, 3]`` in [0, 255], already resized), all drawing from the one
per-image generator that grain seeds by (seed, position). Ops (:data:`AUGMENT_OPS`):

- ``'keras_affine'`` (keys ``augment.rotation_deg``, ``shift_fraction``,
  ``zoom_fraction``): one affine warp, Keras ``ImageDataGenerator``'s;
- ``'horizontal_flip'`` (key ``augment.horizontal_flip``): mirror the columns
  with probability 0.5;
- ``'random_crop'`` (keys ``augment.crop_padding``, ``crop_padding_mode``): pad
  each side by ``crop_padding`` pixels (``numpy.pad`` mode 'reflect', 'edge' or
  'constant' zeros) and crop back to the image's size at a uniform random
  offset: the CIFAR/ResNet recipe (He et al. 2016, section 4.2: 4 pixels
  padded on each side, a random 32x32 crop, and a flip; the paper does not
  name the padding values: torchvision-style code pads zeros, the fast-training
  line reflects, our default). List it before the flip,
  e.g. ``augment.ops=('random_crop', 'horizontal_flip')``.

The default ``('keras_affine', 'horizontal_flip')`` is Keras's order (warp, then
flip). An op whose keys are all at their defaults is off: it draws nothing and
changes nothing, so the draws of the others do not move.

Keras recipe (../shared/seed-attempts.md, and keras ``ImageDataGenerator.get_random_transform`` /
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

Adding an op is one entry (its keys appear in the ``augment`` config section)::

    from imgclf_jax.data.augment import AUGMENT_OPS, AugmentOp

    def vertical_flip(image, rng, settings):
        return image[::-1] if rng.random() < 0.5 else image

    AUGMENT_OPS.register("vertical_flip", AugmentOp({"vertical_flip": False}, vertical_flip))

then ``--config.augment.ops=keras_affine,horizontal_flip,vertical_flip --config.augment.vertical_flip=true``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
import scipy.ndimage as ndi

from imgclf_jax.data import device_ops  # the ops' JAX halves (jax is imported only when they run)
from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Registry, is_default

DEFAULT_OPS = ("keras_affine", "horizontal_flip")  # Keras's order: the warp, then the flip

OpFn = Callable[[np.ndarray, np.random.Generator, Mapping[str, Any]], np.ndarray]


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




# --------------------------------------------------------------------------- the ops table


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """One per-image op of :data:`AUGMENT_OPS`.

    Attributes:
      defaults: ``{key: default}``, the op's keys in the ``augment`` config section. The defaults
        mean "off": with every key at its default the op is skipped (draws nothing). An op with
        no keys runs whenever ``augment.ops`` lists it.
      apply: ``apply(image float32[H, W, 3] in [0, 255], rng, settings) -> float32[H', W', 3]``
        in [0, 255], where ``settings`` is ``{key: value}`` of the op's keys; called only when
        some key differs from its default. All randomness must come from ``rng`` (numpy).
        For an op built by :func:`drawn_op` it is ``apply_drawn(image, draw(rng, ...), settings)``.
      check: ``check(settings)`` raising ConfigError naming ``augment.KEY`` for a value out of
        range; None = every value of the right type is valid.
      draw: for an op that can also run on the accelerator (``data.augment_on='device'``):
        ``draw(rng, settings, height, width) -> float64[num_params]``, every random number the op
        uses for one image (the same draws, in the same order, as its host ``apply``); None = a
        host-only op, which ``data.augment_on='device'`` refuses.
      num_params: the length of ``draw``'s vector.
      device: ``device(image float32[H, W, 3], params float32[num_params], settings) -> float32[H, W, 3]``,
        a pure JAX function of one image (:mod:`imgclf_jax.data.device_augment` maps it over the
        batch under ``jax.jit``); the same result as the host op to float tolerance.
    """

    defaults: Mapping[str, Any]
    apply: OpFn
    check: Callable[[Mapping[str, Any]], None] | None = None
    draw: Callable[..., np.ndarray] | None = None
    num_params: int = 0
    device: Callable[..., Any] | None = None

    def is_active(self, settings: Mapping[str, Any]) -> bool:
        """Whether the op runs: some key of the op differs from its default; an op without keys
        always runs when ``augment.ops`` lists it."""
        if not self.defaults:
            return True
        return any(not is_default(settings[k], d) for k, d in self.defaults.items())


@dataclasses.dataclass(frozen=True)
class _DrawThenApply:
    """The host ``apply`` of a :func:`drawn_op`: draw the parameters, then apply them (picklable for
    grain's worker processes, unlike a closure)."""

    draw: Callable[..., np.ndarray]
    apply_drawn: Callable[..., np.ndarray]

    def __call__(self, image: np.ndarray, rng: np.random.Generator, settings: Mapping[str, Any]) -> np.ndarray:
        return self.apply_drawn(image, self.draw(rng, settings, *image.shape[:2]), settings)


def drawn_op(defaults: Mapping[str, Any], draw: Callable[..., np.ndarray], num_params: int,
             apply_drawn: Callable[..., np.ndarray], device: Callable[..., Any],
             check: Callable[[Mapping[str, Any]], None] | None = None) -> AugmentOp:
    """An op that runs on the host or the accelerator with the same draws (see :class:`AugmentOp`).

    Args:
      defaults, check: as in :class:`AugmentOp`.
      draw: ``(rng, settings, height, width) -> float64[num_params]``.
      apply_drawn: host, ``(image float32[H, W, 3], params float64[num_params], settings) -> image``.
      device: JAX, ``(image float32[H, W, 3], params float32[num_params], settings) -> image``.
    """
    return AugmentOp(defaults, _DrawThenApply(draw, apply_drawn), check, draw, num_params, device)


AUGMENT_OPS = Registry("augment.ops")


def _need(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key 'augment.{key}' must be {what}, got {value!r}")


def _check_keras_affine(s: Mapping[str, Any]) -> None:
    _need(s["rotation_deg"] >= 0, "rotation_deg", ">= 0 degrees", s["rotation_deg"])
    _need(0 <= s["shift_fraction"] < 1, "shift_fraction", "in [0, 1)", s["shift_fraction"])
    _need(0 <= s["zoom_fraction"] < 1, "zoom_fraction", "in [0, 1)", s["zoom_fraction"])


def draw_keras_affine(rng: np.random.Generator, settings: Mapping[str, Any], height: int,
                      width: int) -> np.ndarray:
    """Draws one image's Keras warp (module docstring): ``float64[6]``, the top two rows of
    :func:`affine_matrix` (row-major), mapping output (row, col, 1) to the source (row, col).

    Settings: ``rotation_deg`` r (angle uniform in [-r, r] degrees), ``shift_fraction`` s (row and
    column shifts each uniform in [-s, s] x the image height / width), ``zoom_fraction`` z (row
    and column zoom factors each uniform in [1-z, 1+z]). Draws, in this order and only for the
    non-zero ranges: theta, the row shift, the column shift, the two zoom factors.
    """
    r, s, z = settings["rotation_deg"], settings["shift_fraction"], settings["zoom_fraction"]
    theta = rng.uniform(-r, r) if r else 0.0
    shift_rows = rng.uniform(-s, s) * height if s else 0.0
    shift_cols = rng.uniform(-s, s) * width if s else 0.0
    zoom_rows, zoom_cols = rng.uniform(1 - z, 1 + z, 2) if z else (1.0, 1.0)
    return affine_matrix(theta, shift_rows, shift_cols, zoom_rows, zoom_cols, height, width)[:2].reshape(6)


def apply_keras_affine(image: np.ndarray, params: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """The drawn warp on the host (scipy, :func:`warp`), ``float32[H, W, 3]`` -> same shape."""
    del settings
    return warp(image, np.vstack([np.reshape(params, (2, 3)), [0.0, 0.0, 1.0]]))


def keras_affine(image: np.ndarray, rng: np.random.Generator, settings: Mapping[str, Any]) -> np.ndarray:
    """Keras's random affine warp (module docstring), ``float32[H, W, 3]`` -> same shape:
    :func:`draw_keras_affine`, then :func:`apply_keras_affine`."""
    return apply_keras_affine(image, draw_keras_affine(rng, settings, *image.shape[:2]), settings)


CROP_PADDING_MODES = ("reflect", "edge", "constant")  # numpy.pad modes; 'constant' pads zeros (black)


def _check_random_crop(s: Mapping[str, Any]) -> None:
    p, mode = s["crop_padding"], s["crop_padding_mode"]
    _need(isinstance(p, int) and not isinstance(p, bool) and p >= 0, "crop_padding",
          "an int >= 0 pixels (0 = off)", p)
    _need(mode in CROP_PADDING_MODES, "crop_padding_mode", f"one of {CROP_PADDING_MODES}", mode)
    if p == 0 and mode != "reflect":
        raise ConfigError(f"config key 'augment.crop_padding_mode' ({mode!r}) is not used while "
                          "augment.crop_padding is 0 (no crop): set augment.crop_padding > 0 or leave the "
                          "mode at 'reflect'")


def draw_random_crop(rng: np.random.Generator, settings: Mapping[str, Any], height: int,
                     width: int) -> np.ndarray:
    """Draws one image's crop offset: ``float64[2]`` = (top, left) in the padded image, each uniform
    in {0, ..., 2p} (one draw, ``rng.integers(0, 2 * p + 1, size=2)``); (p, p) is the image itself."""
    del height, width
    p = settings["crop_padding"]
    return rng.integers(0, 2 * p + 1, size=2).astype(np.float64)


def apply_random_crop(image: np.ndarray, params: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """The drawn crop on the host: ``np.pad`` by p with ``crop_padding_mode``, then the ``[H, W]``
    window at (top, left) = `params`."""
    p = settings["crop_padding"]
    height, width = image.shape[:2]
    top, left = (int(v) for v in params)
    padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode=settings["crop_padding_mode"])
    return padded[top:top + height, left:left + width]


def random_crop(image: np.ndarray, rng: np.random.Generator, settings: Mapping[str, Any]) -> np.ndarray:
    """Pads each side by p = ``crop_padding`` pixels and crops back to ``[H, W]`` at a random offset.

    ``float32[H, W, 3]`` in [0, 255] -> the same shape and range. Padding is
    ``np.pad(image, ((p, p), (p, p), (0, 0)), mode)`` with ``crop_padding_mode`` 'reflect'
    (mirrored without repeating the edge pixel: ``[a b c]`` -> ``[c b | a b c | b a]`` for p=2),
    'edge' (the edge pixel repeated) or 'constant' (zeros, black). One draw
    (:func:`draw_random_crop`): the (row, column) offset of the crop in the padded image, each
    uniform in {0, ..., 2p}; offset (p, p) is the image itself. So the content moves by up to p
    pixels in each axis, independently.
    """
    return apply_random_crop(image, draw_random_crop(rng, settings, *image.shape[:2]), settings)


def draw_horizontal_flip(rng: np.random.Generator, settings: Mapping[str, Any], height: int,
                         width: int) -> np.ndarray:
    """Draws one image's flip: ``float64[1]``, 1.0 (flip) with probability 0.5 (``rng.random() < 0.5``)."""
    del settings, height, width
    return np.array([1.0 if rng.random() < 0.5 else 0.0])


def apply_horizontal_flip(image: np.ndarray, params: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """The drawn flip on the host: the columns reversed when ``params[0]`` is 1."""
    del settings
    return image[:, ::-1] if params[0] else image


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, settings: Mapping[str, Any]) -> np.ndarray:
    """Reverses the columns with probability 0.5 (one draw, ``rng.random() < 0.5``); shape unchanged."""
    return apply_horizontal_flip(image, draw_horizontal_flip(rng, settings, *image.shape[:2]), settings)


AUGMENT_OPS.register("keras_affine", drawn_op(
    {"rotation_deg": 0.0, "shift_fraction": 0.0, "zoom_fraction": 0.0}, draw_keras_affine, 6,
    apply_keras_affine, device_ops.keras_affine, _check_keras_affine))
AUGMENT_OPS.register("horizontal_flip", drawn_op(
    {"horizontal_flip": False}, draw_horizontal_flip, 1, apply_horizontal_flip, device_ops.horizontal_flip))
AUGMENT_OPS.register("random_crop", drawn_op(
    {"crop_padding": 0, "crop_padding_mode": "reflect"}, draw_random_crop, 2, apply_random_crop,
    device_ops.random_crop, _check_random_crop))


def op_defaults() -> dict[str, Any]:
    """``{key: default}`` of every registered op's keys, in registration order (the ``augment`` section)."""
    return {key: default for name in AUGMENT_OPS for key, default in AUGMENT_OPS[name].defaults.items()}


# --------------------------------------------------------------------------- the recipe


class AugmentParams:
    """The per-image recipe of the config section ``augment``: ops in order, with their settings.

    ``AugmentParams(ops=DEFAULT_OPS, **settings)``, e.g. ``AugmentParams(**config.augment.to_dict())``
    or ``AugmentParams(rotation_deg=10, horizontal_flip=True)``; a key not given is at its default.

    Attributes:
      ops: tuple of op names, in the order they run.
      settings: ``{key: value}`` of every registered op's key (defaults filled in).

    Raises:
      ConfigError (one line, naming the key): an unknown op, an op listed twice, an unknown key,
        a key of an op that `ops` does not list set away from its default (it would be silently
        ignored), or a value out of its op's range.
    """

    def __init__(self, ops: tuple[str, ...] = DEFAULT_OPS, **settings: Any):
        ops = tuple(ops)
        entries = [AUGMENT_OPS.get(name) for name in ops]
        for i, name in enumerate(ops):
            if name in ops[:i]:
                raise ConfigError(f"config key 'augment.ops' lists {name!r} twice ({', '.join(ops)}): "
                                  "each op runs at most once")
        defaults = op_defaults()
        for key in settings:
            if key not in defaults:
                raise ConfigError(f"unknown config key 'augment.{key}'; valid keys in 'augment': "
                                  f"ops, {', '.join(defaults)}")
        full = {**defaults, **settings}
        listed = {key for entry in entries for key in entry.defaults}
        for name in AUGMENT_OPS:
            for key, default in AUGMENT_OPS[name].defaults.items():
                if key not in listed and not is_default(full[key], default):
                    raise ConfigError(
                        f"config key 'augment.{key}' ({full[key]!r}) belongs to op {name!r}, which "
                        f"augment.ops ({', '.join(ops) or 'empty'}) does not list: add the op or "
                        f"leave the key at {default!r}")
        steps = []
        for entry in entries:
            own = {key: full[key] for key in entry.defaults}
            if entry.check is not None:
                entry.check(own)
            if entry.is_active(own):
                steps.append((entry, own))
        self.ops = ops
        self.settings = full
        self._steps = tuple(steps)

    @property
    def active(self) -> bool:
        """Whether augmentation changes anything (some listed op is on)."""
        return bool(self._steps)

    @property
    def steps(self) -> tuple[tuple[AugmentOp, dict], ...]:
        """The ops that are on, in order: ``(entry, {key: value} of its keys)`` each."""
        return self._steps

    @property
    def num_params(self) -> int:
        """Length of one image's drawn parameter vector (every op on, concatenated in order)."""
        return sum(entry.num_params for entry, _ in self._steps)

    def host_only_ops(self) -> list[str]:
        """Names of the ops that are on and have no device half (``AugmentOp.draw`` is None)."""
        return [name for name in self.ops for entry, _ in self._steps
                if AUGMENT_OPS[name] is entry and entry.draw is None]

    def draw(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """``float32[num_params]``: one image's draws for every op that is on, in order, from `rng`
        (the same numbers, in the same order, as :func:`random_augment` draws for that image).

        Raises:
          ConfigError: an op that is on has no device half (:meth:`host_only_ops`).
        """
        parts = []
        for entry, settings in self._steps:
            if entry.draw is None:
                raise ConfigError(f"config key 'data.augment_on' is 'device' but augment.ops has host-only "
                                  f"op(s) {', '.join(self.host_only_ops())}: set --config.data.augment_on=host")
            parts.append(np.asarray(entry.draw(rng, settings, height, width), np.float64).reshape(entry.num_params))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AugmentParams) and (self.ops, self.settings) == (other.ops, other.settings)

    def __hash__(self) -> int:
        return hash((self.ops, tuple(sorted(self.settings.items()))))

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"AugmentParams(ops={self.ops!r}, {keys})"


def random_augment(image: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Augments one image: the ops of `params` that are on, in order, all drawing from `rng`.

    Args:
      image: ``uint8[H, W, 3]`` (or float) pixels, 0..255, already resized.
      rng: the per-image generator (grain's ``random_map`` seeds it by pipeline seed and index).
      params: the recipe.

    Returns:
      ``float32[H, W, 3]`` in [0, 255]; with every op off, the input unchanged (and nothing drawn).
    """
    out = image.astype(np.float32)
    for entry, settings in params._steps:
        out = entry.apply(out, rng, settings)
    return np.ascontiguousarray(out)
