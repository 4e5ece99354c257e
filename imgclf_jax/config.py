"""The config schema, config-file loading, ``--config.KEY=VALUE`` overrides and validation.

Every config file under ``configs/`` is an ml_collections file: a module with
``get_config() -> ml_collections.ConfigDict``. They all start from
:func:`base_config`, so every config has every key below, with the same type;
an override can only change the value of an existing key, with a value of that
key's type. Derived values (number of classes, steps per epoch) are computed in
code from the data, never stored here.

The ``model`` section is the chosen model's (:func:`model_section`): ``model.name``
(a name of :data:`imgclf_jax.models.MODELS`), ``model.l2``, ``model.fast_path`` and
that model's own keys. Changing ``model.name`` (in a config file, by an override, or
with :func:`select_model` in code) gives the section of the new model, and the
schema a config is checked against is the one of its ``model.name`` (:func:`schema`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any, Iterator

import ml_collections

from imgclf_jax.backend import SETTINGS as FAST_PATH_SETTINGS
from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import check_unused_keys, is_default

RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
MONITORS = ("", "val_loss", "val_accuracy")
KEEP_CHECKPOINTS = ("resume", "result")  # train.keep_checkpoints


def base_config() -> ml_collections.ConfigDict:
    """Returns the full config schema with defaults (attempt 1's recipe on the competition data).

    Keys, units and meanings are documented inline; the reference configs in
    ``configs/`` change only what their recipe changes.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # init, dropout, data order and augmentation all derive from it

    c.data = ml_collections.ConfigDict()
    # 'competition': train.csv/validation.csv[/test.csv] + one image folder per split;
    # 'folders': one folder per class (optionally under train/ with validation/ (or val/, valid/) and test/);
    # 'digits': scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB (no download; data.dir must be '').
    c.data.builder = "competition"
    c.data.dir = "data/deepfake-classification-unibuc"  # the folder Kaggle's zip unpacks to
    c.data.cache_dir = "~/.cache/imgclf_jax"  # prepared array_record files; never inside data.dir
    c.data.image_size = 128  # pixels; images are resized to image_size x image_size
    c.data.resize_method = "nearest"  # PIL filter; 'nearest' is Keras load_img's default
    # Per-channel normalization (R, G, B), in units of the [0, 1] pixel scale: image = (x / 255 - mean) / std,
    # the same for training, validation, test and predict. () = off (images in [0, 1]); set both or neither.
    # `python -m imgclf_jax.channel_stats --config CONFIG` computes them from the training split.
    c.data.channel_mean = ()
    c.data.channel_std = ()
    c.data.max_train_examples = 0  # 0 = all; else a class-balanced subset, taken before resampling
    c.data.max_val_examples = 0  # 0 = all; else a class-balanced subset
    # 0 = infer (competition: largest training label + 1; folders: the class folders); else competition
    # labels must lie in 0..num_classes-1 and folders must have num_classes class folders.
    c.data.num_classes = 0
    c.data.val_fraction = 0.1  # fraction held out when the data has no validation split
    c.data.split_seed = 0  # seed of that held-out split and of the subsets (not `seed`: stays fixed)
    c.data.class_repeats = ()  # per-class repeat factor per epoch, e.g. (2, 2, 2, 2, 3); () = 1 each
    c.data.num_workers = 0  # grain worker processes (0 = in the main process); never changes batches
    # Where the augment ops run (imgclf_jax.data.device_augment): 'host' (scipy, grain threads), 'device'
    # (jitted JAX on the accelerator, the same per-image draws), or 'auto': host on CPU, device on GPU/TPU.
    c.data.augment_on = "auto"
    # True: the training split lives in device memory (uint8 at data.image_size), batches carry only rows
    # and draws; needs device augmentation (augment_on 'auto' or 'device'); memory is checked first.
    c.data.on_device = False

    from imgclf_jax.data import augment  # its op table supplies the augment keys

    # Per-image ops applied in this order (imgclf_jax.data.augment.AUGMENT_OPS); the default is Keras
    # ImageDataGenerator's warp then flip. Then every op's keys, each documented with its op; an op whose
    # keys are all at their defaults is off (draws nothing):
    #   keras_affine: rotation_deg (angle uniform in [-r, r] degrees), shift_fraction (each shift uniform in
    #     [-s, s] x image size), zoom_fraction (two zoom factors, one per axis, each uniform in [1-z, 1+z]);
    #   horizontal_flip: horizontal_flip (flip with probability 0.5);
    #   random_crop: crop_padding (pixels padded on each side, 0 = off; then a crop back to the image's size
    #     at an offset uniform in {0..2p} per axis), crop_padding_mode ('reflect', 'edge' or 'constant' zeros).
    c.augment = ml_collections.ConfigDict()
    c.augment.ops = augment.DEFAULT_OPS
    for key, default in augment.op_defaults().items():
        c.augment[key] = default

    c.loss = loss_section()  # the data term of the loss (imgclf_jax.losses.LOSSES)

    from imgclf_jax.models import DEFAULT_MODEL  # here: imports flax, and the models never import config

    # model.name, model.l2, model.fast_path and the chosen model's own keys (see model_section)
    c.model = model_section(DEFAULT_MODEL)

    c.optimizer = optimizer_section()

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10
    c.train.batch_size = 32  # global batch; an epoch is ceil(N / batch_size) updates
    c.train.early_stopping = ml_collections.ConfigDict()
    c.train.early_stopping.monitor = ""  # '' = off, 'val_loss' or 'val_accuracy' (Keras EarlyStopping)
    c.train.early_stopping.patience = 0  # epochs without improvement before stopping
    # 'resume': keep checkpoints/latest (what resuming or training further needs) and checkpoints/result;
    # 'result': once the run has finished, delete checkpoints/latest and keep only checkpoints/result.
    c.train.keep_checkpoints = "resume"
    # TensorBoard's train/loss_per_step every this many updates (the mean since the previous point or the
    # epoch's start; imgclf_jax.tracking); 0 = off. Per-epoch scalars and metrics.csv are always written.
    c.train.log_every_steps = 50
    # Recipe slots ('' = off): a per-batch transform inside the train step (imgclf_jax.batch_transforms,
    # e.g. MixUp) and an evaluation-time transform of the forward pass (imgclf_jax.eval_transforms,
    # e.g. 'horizontal_flip_tta': mean softmax over the image and its mirror; validation, test, predict).
    c.train.batch_transform = ""
    c.train.eval_transform = ""
    # Exponential moving average of the weights (and BatchNorm statistics), updated after every step with decay
    # min(ema_decay, (1 + t) / (10 + t)) at update t (TensorFlow's ExponentialMovingAverage warm-up); 0.0 = off.
    # When on, validation, early stopping's best weights, the result checkpoint and predict use the average.
    c.train.ema_decay = 0.0
    # The eval transforms' keys (imgclf_jax.eval_transforms; each read only by the transform that declares it,
    # any other must stay at its default): shift_pixels (flip_shift_tta: the +-s pixel shifts of its views).
    c.tta = tta_section()
    # The batch transforms' settings (MixUp, CutMix; imgclf_jax.batch_transforms), see mixing_section.
    c.mixing = mixing_section()

    c.ensemble = ml_collections.ConfigDict()  # K members trained in one job (imgclf_jax.ensemble)
    c.ensemble.num_members = 1  # K; 1 = the plain run. Member i uses seed `seed + i` for everything
    c.ensemble.shared_data = False  # True: every member sees the same batches (member 0's stream)
    # How the step maps over members: 'vmap', 'unroll' (a loop inside the compiled step),
    # 'map' (lax.map) or 'auto' (unroll on CPU, vmap elsewhere; see imgclf_jax.ensemble.mapping).
    c.ensemble.mapping = "auto"
    c.ensemble.vote = "majority"  # rule for submission.csv and the confusion matrix: 'majority' or 'soft'
    # A hyperparameter population: 'KEY=V1,V2;KEY2=...' trains one member per combination (their
    # product) x num_members seeds, in one compiled step (imgclf_jax.ensemble.population); '' = off.
    c.ensemble.sweep = ""

    # Several processes as one run (imgclf_jax.distributed; python -m imgclf_jax.launch starts them locally).
    # A single process needs none of it. Unset keys come from the environment (JAX's cluster detection:
    # srun, mpirun, TPU slices, JAX_COORDINATOR_ADDRESS).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; '' = from the environment
    c.distributed.num_processes = 0  # 0 = from the environment (a single process when it says nothing); 1 = single
    c.distributed.process_id = -1  # this process's index, 0..num_processes-1; -1 = from the environment
    # Seconds without heartbeats after which JAX's coordination service declares a process dead (the others
    # then stop with one line naming it), and seconds to wait for every process to join at the start.
    c.distributed.heartbeat_timeout_s = 60
    c.distributed.initialization_timeout_s = 300
    return c


def tta_section() -> ml_collections.ConfigDict:
    """The ``tta`` section: every key an :data:`imgclf_jax.eval_transforms.EVAL_TRANSFORMS` entry reads, at its
    default (read from the table when called, so an entry registered later brings its keys)."""
    from imgclf_jax import eval_transforms  # here: jax is slow to import, and eval_transforms never imports config

    t = ml_collections.ConfigDict()
    for key, default in eval_transforms.tta_defaults().items():
        t[key] = default
    return t


def _union_of_keys(table: Any, taken: set[str]) -> dict[str, Any]:
    """``{key: default}`` over the entries of `table` (in registration order).

    Raises:
      ValueError: two entries declare one key with different defaults, or a key is in `taken`
        (a programming error in an entry, not a user's).
    """
    keys: dict[str, Any] = {}
    for name in table:
        for key, default in table[name].keys.items():
            if key in taken or (key in keys and keys[key] != default):
                raise ValueError(f"key '{key}' of {table.key}='{name}' clashes with another key of its section")
            keys[key] = default
    return keys


def loss_section() -> ml_collections.ConfigDict:
    """The ``loss`` section: ``name`` and every key a :data:`imgclf_jax.losses.LOSSES` entry reads.

    Read from the table when called (an entry registered later brings its keys), as
    :func:`optimizer_section`. softmax_cross_entropy: ``label_smoothing`` (eps in [0, 1), 0 = off:
    targets ``(1 - eps) t + eps / C``, for the labels and a batch transform's soft targets alike).
    """
    from imgclf_jax import losses  # here: jax is slow to import, and losses never imports config

    section = ml_collections.ConfigDict()
    section.name = losses.DEFAULT  # masked mean over the real rows; takes soft targets
    for key, default in _union_of_keys(losses.LOSSES, {"name"}).items():
        section[key] = default
    return section


def mixing_section() -> ml_collections.ConfigDict:
    """The ``mixing`` section: every key a :data:`imgclf_jax.batch_transforms.BATCH_TRANSFORMS` entry reads.

    Read from the table when called, as :func:`optimizer_section`. mixup, cutmix, mixup_cutmix:
    ``alpha`` (lambda ~ Beta(alpha, alpha), > 0) and ``probability`` (per batch, the chance that the
    transform applies; else the batch is unchanged with one-hot targets). With
    ``train.batch_transform=''`` every key must stay at its default (a setting nothing reads).
    """
    from imgclf_jax import batch_transforms  # here: jax is slow to import, and it never imports config

    section = ml_collections.ConfigDict()
    for key, default in _union_of_keys(batch_transforms.BATCH_TRANSFORMS, set()).items():
        section[key] = default
    return section


def optimizer_section() -> ml_collections.ConfigDict:
    """The ``optimizer`` section: name, learning_rate, schedule, and every key an optimizer or schedule reads.

    Read from :data:`imgclf_jax.optim.OPTIMIZERS` and :data:`~imgclf_jax.optim.SCHEDULES` when called
    (so an entry registered later, e.g. by a test, brings its keys): each entry declares the keys it
    reads with their defaults (keras_adam, adam: b1, b2, eps; adamw: those and weight_decay; sgd:
    momentum, nesterov, weight_decay; exponential_decay: decay_steps, decay_rate, staircase;
    warmup_cosine: warmup_epochs, final_lr_fraction; one_cycle: warmup_epochs, div_factor,
    final_div_factor). :func:`validate` refuses a key the chosen entry does not read unless it is at
    its default.
    """
    from imgclf_jax import optim  # here: jax is slow to import, and optim never imports config

    o = ml_collections.ConfigDict()
    # an optim.OPTIMIZERS entry: 'keras_adam' (Keras's Adam), 'adam' (optax), 'adamw', 'sgd' (momentum, SGDW)
    o.name = "keras_adam"
    o.learning_rate = 1e-3  # initial learning rate
    for key, default in _union_of_keys(optim.OPTIMIZERS, {"name", "learning_rate", "schedule"}).items():
        o[key] = default
    # an optim.SCHEDULES entry: 'constant', 'exponential_decay' (Keras's), 'warmup_cosine', 'one_cycle'
    o.schedule = "constant"
    for key, default in _union_of_keys(optim.SCHEDULES, set(o.keys())).items():
        o[key] = default
    return o


def model_section(name: str, common: Any = None) -> ml_collections.ConfigDict:
    """The ``model`` section of model `name`: ``model.name``, the model's own keys at their defaults
    (its entry's ``config()``, :data:`imgclf_jax.models.MODELS`), then the keys common to every model.

    Args:
      name: a registered model name.
      common: a model section whose ``l2``, ``fast_path``, ``compute_dtype`` and ``matmul_precision`` are kept
        (None: their defaults).

    Raises:
      ConfigError: `name` is not registered (one line listing the registered names).
    """
    from imgclf_jax.models import MODELS  # here: imports flax, and the models never import config

    own = MODELS.get(name).config()
    m = ml_collections.ConfigDict()
    m.name = name  # the model family, one of imgclf_jax.models.MODELS ('branched_cnn': the reference CNN)
    for key in own.keys():
        m[key] = own[key]
    m.l2 = 0.0  # Keras L2 factor l: loss += l * sum(w**2) for the model's regularized kernels
    # Faster CPU ops with the same results (imgclf_jax.backend decides): 'auto' (on for CPU), 'on', 'off';
    # the environment variable IMGCLF_JAX_FAST_PATH=0 turns it off whatever this says.
    m.fast_path = "auto"
    # The precision policy (imgclf_jax.models.base): the layers compute in 'float32' or 'bfloat16' (params,
    # gradients and optimizer state float32 either way; the fast path is float32 only); matmul_precision
    # 'default' (the backend's: TensorFloat-32 for float32 convs on recent NVIDIA GPUs) or 'highest'.
    m.compute_dtype = "float32"
    m.matmul_precision = "default"
    if common is not None:
        m.l2, m.fast_path = common.l2, common.fast_path
        m.compute_dtype = common.get("compute_dtype", "float32")
        m.matmul_precision = common.get("matmul_precision", "default")
    return m


def select_model(config: ml_collections.ConfigDict, name: str) -> None:
    """Makes `config` use model `name`: a new model rebuilds the ``model`` section (``model.l2`` and
    ``model.fast_path``, ``model.compute_dtype``, ``model.matmul_precision`` kept, the new model's own keys at their defaults); the same name changes nothing
    (unless the section does not have that model's keys, as after ``config.model.name = name`` in code).

    Raises:
      ConfigError: `name` is not registered (listing the registered names).
    """
    section = model_section(name, common=config.model)
    if name != config.model.get("name") or set(config.model.keys()) != set(section.keys()):
        config.model = section


def schema(config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """:func:`base_config` with the ``model`` section of `config`'s ``model.name`` (the default without one).

    Raises:
      ConfigError: an unknown ``model.name`` (listing the registered names).
    """
    base = base_config()
    model = config.get("model") if config is not None else None
    name = model.get("name") if isinstance(model, ml_collections.ConfigDict) else None
    if isinstance(name, str) and name != base.model.name:
        base.model = model_section(name)
    return base


def _settle_model_section(config: ml_collections.ConfigDict) -> None:
    """A config file that sets ``model.name`` to another model gets that model's section.

    The file starts from :func:`base_config` (the default model's keys) and may set the chosen
    model's own keys: the default model's keys it left at their defaults are dropped, the chosen
    model's keys it did not set are added at their defaults. A default model's key it changed
    stays, so :func:`check_schema` refuses it (a setting the chosen model would ignore).
    """
    from imgclf_jax.models import DEFAULT_MODEL as default, MODELS

    model = config.get("model")
    if not isinstance(model, ml_collections.ConfigDict):
        return
    name = model.get("name")
    if not isinstance(name, str) or name == default or name not in MODELS:
        return  # check_schema reports a missing or unknown name
    target, leftover = model_section(name), model_section(default)

    values = {key: (model[key] if key in model else target[key]) for key in target.keys()}
    values.update({key: model[key] for key in model.keys()
                   if key not in target and not (key in leftover and is_default(model[key], leftover[key]))})
    config.model = ml_collections.ConfigDict(values)


# --------------------------------------------------------------------------- keys


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Yields every leaf key of `config` as a dotted path, e.g. 'train.batch_size'."""
    for name in sorted(config.keys()):
        value = config[name]
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_keys(value, path + ".")
        else:
            yield path


def _unknown_key(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    """The error for an unknown key: a close match, and the valid keys of its section (or all)."""
    valid = list(leaf_keys(config))
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    section = key.rpartition(".")[0]
    in_section = [k for k in valid if section and k.startswith(section + ".")]
    where = f"valid keys in '{section}'" if in_section else "valid keys"
    return ConfigError(f"unknown config key '{key}'{hint}; {where}: {', '.join(in_section or valid)}")


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """Returns (parent dict, leaf name) for dotted `key`, or raises ConfigError naming it."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(key, config)
        node = node[part]
    if parts[-1] not in node or isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise _unknown_key(key, config)
    return node, parts[-1]


# --------------------------------------------------------------------------- values


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses override `text` to the type of the key's current value."""
    kind = type(current)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {text!r}")

    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("a bool (true/false)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a float") from None
    if kind is str:
        return text
    if kind in (tuple, list):
        try:
            value = ast.literal_eval(text) if text.strip() else ()
        except (ValueError, SyntaxError):
            # Bare words: 'same,valid' or '[same,valid]' -> ('same', 'valid'); '(same,)' -> ('same',).
            parts = [part.strip() for part in text.strip().strip("()[]").split(",")]
            if len(parts) > 1 and parts[-1] == "":  # the trailing comma of a 1-tuple
                parts.pop()
            value = tuple(parts)
        if current and type(current[0]) is bool:
            words = {"true": True, "false": False, "1": True, "0": False}
            value = tuple(words.get(str(v).strip().lower(), v) if not isinstance(v, bool) else v
                          for v in (value if isinstance(value, (tuple, list)) else (value,)))
        if not isinstance(value, (tuple, list)):
            value = (value,)
        value = tuple(value)
        if current:
            elem = type(current[0])
            if not all(type(v) is elem or (elem is float and type(v) is int) for v in value):
                raise bad(f"a tuple of {elem.__name__}")
            value = tuple(elem(v) for v in value)
        return value
    raise bad(kind.__name__)


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` of `config` from the command-line string `text`.

    ``model.name`` selects a model (:func:`select_model`: another name rebuilds the ``model``
    section, so apply it before the overrides of that model's keys; :func:`apply_overrides` does).

    Raises:
      ConfigError: unknown key (listing the valid ones), a value of the wrong type or an unknown
        model name (listing the registered ones).
    """
    if key == "model.name":
        select_model(config, text.strip())
        return
    parent, name = _lookup(config, key)
    parent[name] = _parse_value(key, text, parent[name])


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    """Applies (KEY, VALUE) overrides in order, those of ``model.name`` first (they rebuild the section).

    Raises:
      ConfigError: as :func:`apply_override`.
    """
    for key, text in sorted(overrides, key=lambda pair: pair[0] != "model.name"):
        apply_override(config, key, text)


def available_configs(path: str) -> str:
    """A phrase listing the config files a user may have meant instead of the missing `path`.

    Looks in `path`'s folder, else ``configs/`` under the working directory, else the
    ``configs/`` folder beside the installed package: 'available: configs/digits.py, ...'
    (the ``.py`` files there, sorted, none starting with '_'), or 'no config files in ...'.
    """
    package_configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    folder = os.path.dirname(path)
    candidates = [folder] if folder and os.path.isdir(folder) else []
    candidates += ["configs", package_configs]
    for candidate in candidates:
        if os.path.isdir(candidate):
            names = sorted(n for n in os.listdir(candidate) if n.endswith(".py") and not n.startswith("_"))
            if names:
                shown = os.path.relpath(candidate) if not os.path.relpath(candidate).startswith("..") else candidate
                return "available: " + ", ".join(os.path.join(shown, n) for n in names)
    return f"no config files in '{candidates[0]}'"


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports `path` and returns its ``get_config()``, checked against :func:`base_config`.

    Raises:
      ConfigError: missing file (listing the available configs), no ``get_config``, or keys/types
        that differ from the schema.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; {available_configs(path)}")
    if not path.endswith(".py"):
        raise ConfigError(f"config file '{path}' is not a Python file (configs/NAME.py)")
    spec = importlib.util.spec_from_file_location("_imgclf_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is a user error: say where.
        raise ConfigError(f"config file '{path}' failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config()")
    try:
        config = module.get_config()
    except Exception as e:  # e.g. a value of the wrong type for a key
        raise ConfigError(f"config file '{path}': get_config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file '{path}': get_config() must return an ml_collections.ConfigDict")
    _settle_model_section(config)
    check_schema(config, source=path)
    return config


def check_schema(config: ml_collections.ConfigDict, source: str = "config") -> None:
    """Raises ConfigError if `config` has keys or value types other than its :func:`schema`'s.

    The ``model`` section is checked against the section of its ``model.name``: an unknown key
    lists the valid keys of that model's section; an unknown name lists the registered models.
    """
    try:
        base = schema(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    have, want = set(leaf_keys(config)), set(leaf_keys(base))
    for key in sorted(have - want):
        raise ConfigError(f"{source}: {_unknown_key(key, base)}")
    for key in sorted(want - have):
        raise ConfigError(f"{source}: config key '{key}' is missing")
    for key in sorted(want):
        parent, name = _lookup(config, key)
        bparent, _ = _lookup(base, key)
        value, default = parent[name], bparent[name]
        ok = type(value) is type(default) or (type(default) is float and type(value) is int)
        ok = ok or (isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)))
        if not ok:
            raise ConfigError(
                f"{source}: config key '{key}' expects {type(default).__name__}, got {value!r}"
            )


# --------------------------------------------------------------------------- validation

def check_builder_keys(data: ml_collections.ConfigDict) -> None:
    """Refuses an unknown data.builder, a data key the chosen builder would ignore, and a file builder
    without data.dir (the rules are the :data:`imgclf_jax.data.builders.BUILDERS` entries' ``ignored_keys``).

    Raises:
      ConfigError: one line naming the key, the builder and what to do (or the valid builders).
    """
    from imgclf_jax.data import builders  # here: tensorflow_datasets is slow to import

    entry = builders.BUILDERS[data.builder]
    folder_builders = " or ".join(name for name in builders.BUILDERS
                                  if "dir" not in builders.BUILDERS[name].ignored_keys)
    for name, (accepted, why) in entry.ignored_keys.items():
        value = data[name]
        accepted = accepted if isinstance(accepted, tuple) else (accepted,)
        if value not in accepted:
            shown = " or ".join(f"--config.data.{name}={a!r}" if a == "" else f"--config.data.{name}={a}"
                                for a in accepted)
            raise ConfigError(
                f"config key 'data.{name}' ({value!r}) is not used by data.builder='{data.builder}' "
                f"({why}): set {shown}, or use data.builder={folder_builders} to train on a folder")
    if "dir" not in entry.ignored_keys and not data.dir.strip():
        raise ConfigError(f"config key 'data.dir' must name the data folder for data.builder='{data.builder}' "
                          "(--config.data.dir=PATH)")


def check_normalization(data: ml_collections.ConfigDict) -> None:
    """Checks ``data.channel_mean`` / ``data.channel_std``: both () (off) or both 3 numbers, every std > 0.

    Raises:
      ConfigError: one line naming the key.
    """
    mean, std = tuple(data.channel_mean), tuple(data.channel_std)
    if bool(mean) != bool(std):
        given, missing = ("channel_mean", "channel_std") if mean else ("channel_std", "channel_mean")
        raise ConfigError(f"config key 'data.{given}' is set but 'data.{missing}' is not: set both (3 values "
                          f"each, R, G, B) or neither (off); `python -m imgclf_jax.channel_stats --config ...` "
                          "computes them")
    for key, values in (("channel_mean", mean), ("channel_std", std)):
        if values and (len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and math.isfinite(v) for v in values)):
            raise ConfigError(f"config key 'data.{key}' must be 3 finite numbers (R, G, B, in units of the "
                              f"[0, 1] pixel scale) or () (off), got {values!r}")
    if std and not all(v > 0 for v in std):
        raise ConfigError(f"config key 'data.channel_std' must be > 0 in every channel, got {std!r}")
    # Values on the 0..255 scale (as some libraries quote ImageNet's) would train on almost constant inputs; a
    # mean is pasted with its std, so the mean's range catches both.
    if mean and not all(0.0 <= v <= 1.0 for v in mean):
        raise ConfigError(f"config key 'data.channel_mean' must be in [0, 1] (the [0, 1] pixel scale, not "
                          f"0..255: divide by 255), got {mean!r}")


def check_optimizer(o: ml_collections.ConfigDict) -> None:
    """Checks the optimizer section against :data:`imgclf_jax.optim.OPTIMIZERS` and ``SCHEDULES``.

    Order (today's): optimizer.name, learning_rate, the optimizer entries' value checks,
    optimizer.schedule, the schedule entries' value checks (every key is checked, whatever the
    choice), then the keys the chosen optimizer and schedule do not read, which must be at their
    defaults (a setting that would be silently ignored is refused).

    Raises:
      ConfigError: one line naming the key (an unknown name lists the valid ones).
    """
    from imgclf_jax import optim  # here: jax is slow to import, and optim never imports config

    chosen = optim.OPTIMIZERS[o.name]
    if not o.learning_rate > 0:
        raise ConfigError(f"config key 'optimizer.learning_rate' must be > 0, got {o.learning_rate!r}")
    for name in optim.OPTIMIZERS:
        optim.OPTIMIZERS[name].validate(o)
    schedule = optim.SCHEDULES[o.schedule]
    for name in optim.SCHEDULES:
        optim.SCHEDULES[name].validate(o)
    for table, entry, key in ((optim.OPTIMIZERS, chosen, "name"), (optim.SCHEDULES, schedule, "schedule")):
        defaults = _union_of_keys(table, set())
        check_unused_keys(o, "optimizer", defaults, set(entry.keys), f"optimizer.{key}={o[key]!r}")


def _check_model_keys(m: ml_collections.ConfigDict) -> None:
    """The ``model`` section has exactly the keys of its model (set in code without select_model?)."""
    from imgclf_jax.models import DEFAULT_MODEL

    name = m.get("name", DEFAULT_MODEL)
    want = model_section(name)
    have = set(m.keys())
    for key in sorted(have - set(want.keys())):
        raise ConfigError(f"config key 'model.{key}' is not a key of model.name='{name}'; valid keys in "
                          f"'model': {', '.join('model.' + k for k in sorted(want.keys()))} (change "
                          "model.name with config.select_model, which rebuilds the section)")
    for key in sorted(set(want.keys()) - have):
        raise ConfigError(f"config key 'model.{key}' is missing (model.name='{name}'; change model.name "
                          "with config.select_model, which rebuilds the section)")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values for impossible settings; raises ConfigError naming the key.

    The ``model`` section is checked by its model's entry (``model.name``, see :mod:`imgclf_jax.models`).
    """
    from imgclf_jax.models import model_entry

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            parent, name = _lookup(config, key)
            raise ConfigError(f"config key '{key}' must be {what}, got {parent[name]!r}")

    d, m, o, t = config.data, config.model, config.optimizer, config.train
    check_builder_keys(d)
    need(d.image_size >= 1, "data.image_size", ">= 1 pixel")
    need(d.resize_method in RESIZE_METHODS, "data.resize_method", f"one of {RESIZE_METHODS}")
    need(d.max_train_examples >= 0, "data.max_train_examples", ">= 0 (0 = all)")
    need(d.max_val_examples >= 0, "data.max_val_examples", ">= 0 (0 = all)")
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "in (0, 1)")
    need(d.num_classes >= 0, "data.num_classes", ">= 0 (0 = infer from the labels)")
    need(bool(d.cache_dir.strip()), "data.cache_dir", "a folder path")
    need(0 <= config.seed < 2**32, "seed", "in [0, 2**32)")
    need(0 <= d.split_seed < 2**32, "data.split_seed", "in [0, 2**32)")
    for key in leaf_keys(config):
        parent, name = _lookup(config, key)
        values = parent[name] if isinstance(parent[name], (tuple, list)) else (parent[name],)
        need(all(math.isfinite(v) for v in values if isinstance(v, float)), key, "finite")
    need(all(isinstance(r, int) and r >= 1 for r in d.class_repeats), "data.class_repeats",
         "a tuple of ints >= 1")
    need(d.num_workers >= 0, "data.num_workers", ">= 0")
    from imgclf_jax.data import placement

    need(isinstance(d.on_device, bool), "data.on_device", "true or false")
    placement.check(d)  # data.augment_on's value, and not 'host' with data.on_device
    check_normalization(d)
    validate_recipe(config)
    _check_model_keys(m)
    model_entry(m).validate(m, d.image_size)  # the model's own keys (imgclf_jax.models.MODELS)
    need(m.l2 >= 0, "model.l2", ">= 0")
    need(m.fast_path in FAST_PATH_SETTINGS, "model.fast_path", f"one of {FAST_PATH_SETTINGS}")
    from imgclf_jax.models.base import COMPUTE_DTYPES, MATMUL_PRECISIONS

    need(m.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", f"one of {COMPUTE_DTYPES}")
    need(m.matmul_precision in MATMUL_PRECISIONS, "model.matmul_precision", f"one of {MATMUL_PRECISIONS}")
    if not model_entry(m).precision_policy:  # its create would not read them: refused, never ignored
        need(m.compute_dtype == "float32", "model.compute_dtype",
             f"'float32' for model.name={m.name!r} (its entry does not follow the precision policy)")
        need(m.matmul_precision == "default", "model.matmul_precision",
             f"'default' for model.name={m.name!r} (its entry does not follow the precision policy)")
    need(m.fast_path != "on" or m.compute_dtype == "float32", "model.fast_path",
         f"'auto' or 'off' with model.compute_dtype={m.compute_dtype!r} (the fast-path kernels are float32)")
    check_optimizer(o)
    need(t.num_epochs >= 1, "train.num_epochs", ">= 1")
    from imgclf_jax import optim

    if "warmup_epochs" in optim.SCHEDULES[o.schedule].keys:  # in updates: checked when the data is known
        need(o.warmup_epochs < t.num_epochs, "optimizer.warmup_epochs",
             f"< train.num_epochs ({t.num_epochs}) for optimizer.schedule={o.schedule!r}")
    if o.schedule == "one_cycle":  # it rises over at least one update (the exact count needs the data)
        need(o.warmup_epochs > 0, "optimizer.warmup_epochs", "> 0 for optimizer.schedule='one_cycle' (its rising phase)")
    need(t.batch_size >= 1, "train.batch_size", ">= 1")
    need(t.early_stopping.monitor in MONITORS, "train.early_stopping.monitor", f"one of {MONITORS}")
    need(t.early_stopping.patience >= 0, "train.early_stopping.patience", ">= 0 epochs")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "in [0, 1) (0 = off)")
    need(isinstance(t.log_every_steps, int) and t.log_every_steps >= 0, "train.log_every_steps",
         "an integer >= 0 (updates; 0 = off)")
    need(t.keep_checkpoints in KEEP_CHECKPOINTS, "train.keep_checkpoints", f"one of {KEEP_CHECKPOINTS}")
    e = config.ensemble
    need(e.num_members >= 1, "ensemble.num_members", ">= 1 (1 = a plain run)")
    need(config.seed + e.num_members <= 2**32, "ensemble.num_members", "such that seed + num_members <= 2**32")
    from imgclf_jax.ensemble import mapping, voting  # voting is light; mapping imports jax

    mapping.MAPPINGS.get(e.mapping)  # ConfigError listing the valid names
    voting.VOTES.get(e.vote)
    from imgclf_jax.ensemble import population

    population.check_sweep(config, validate)
    from imgclf_jax import distributed

    distributed.check_section(config.distributed)


def validate_recipe(config: ml_collections.ConfigDict) -> None:
    """Checks the recipe keys against their tables: augment (ops and their keys), loss (and its keys),
    the two slots (and the batch transforms' ``mixing`` keys), tta.

    Raises:
      ConfigError: one line naming the key: an unknown or repeated op, a key of an op not in
        ``augment.ops`` away from its default, an op's value out of range, an unknown
        ``loss.name`` / ``train.batch_transform`` / ``train.eval_transform``, a ``loss.*`` or
        ``mixing.*`` value out of range or away from its default while the chosen entry (or no
        batch transform) does not read it, a loss that cannot take the soft targets the batch
        transform makes, a ``tta`` value out of range, or a ``tta`` key the chosen eval transform
        does not read away from its default.
    """
    from imgclf_jax import batch_transforms, eval_transforms, losses
    from imgclf_jax.data import augment

    recipe = augment.AugmentParams(**config.augment.to_dict())
    host_only = recipe.host_only_ops()
    if host_only and (config.data.get("augment_on") == "device" or config.data.get("on_device")):
        key = "data.on_device" if config.data.get("on_device") else "data.augment_on"
        raise ConfigError(f"config key '{key}' asks for augmentation on the device, but augment.ops has "
                          f"host-only op(s) {', '.join(host_only)} (no AugmentOp.draw/device): use "
                          "--config.data.augment_on=host --config.data.on_device=false, or give the op a device half")
    loss = losses.LOSSES.get(config.loss.name)
    for name in losses.LOSSES:
        losses.LOSSES[name].validate(config.loss)
    check_unused_keys(config.loss, "loss", _union_of_keys(losses.LOSSES, set()), set(loss.keys),
                      f"loss.name={config.loss.name!r}")
    transform = batch_transforms.BATCH_TRANSFORMS.get(config.train.batch_transform)
    for name in batch_transforms.BATCH_TRANSFORMS:
        batch_transforms.BATCH_TRANSFORMS[name].validate(config.mixing)
    check_unused_keys(config.mixing, batch_transforms.SECTION,
                      _union_of_keys(batch_transforms.BATCH_TRANSFORMS, set()),
                      set(transform.keys) if transform is not None else set(),
                      f"train.batch_transform={config.train.batch_transform!r}")
    losses.check_targets(config.loss.name, transform is not None and transform.makes_targets,
                         config.train.batch_transform)
    chosen = eval_transforms.entry(config.train.eval_transform)
    for name in eval_transforms.EVAL_TRANSFORMS:
        eval_transforms.entry(name).validate(config.tta)
    check_unused_keys(config.tta, "tta", eval_transforms.tta_defaults(), set(chosen.keys) if chosen else set(),
                      f"train.eval_transform={config.train.eval_transform!r}")
