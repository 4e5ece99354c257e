"""Memory a training run needs, known before it runs: per member, from XLA's own analysis of the step.

:func:`member_memory` lowers and compiles one member's train step on abstract
shapes (nothing is allocated or run; a second or two) and reads XLA's
``memory_analysis()``: the params, the optimizer state (Adam: two moments, the
size of the params each) and the step's temporaries (activations kept for the
backward pass, gradients and workspace) at the per-device batch.

An ensemble of K members needs about K times one member plus, when early
stopping restores the best weights, a copy of each member's params
(:func:`ensemble_need_bytes`). That is an upper estimate for the 'unroll'
mapping, where XLA may reuse one member's temporaries for the next.
:func:`check_fits` compares it with what the backend has: each device's free
memory where it reports one (GPU), else the host's available RAM (CPU, where
forced host devices share that RAM).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from imgclf_jax import steps
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import entry_for

GIB = 2.0**30
HOST_PROCESS_BYTES = 2**30  # libraries, input pipeline, evaluation: measured 1.0-1.1 GiB RSS beside the step


@dataclasses.dataclass(frozen=True)
class MemberMemory:
    """Bytes one member's training needs on one device (float32 everything).

    params: the parameters; opt_state: the optimizer state (Adam: 2 x params plus a counter);
    temp: the train step's temporaries at `batch` images per device (activations, gradients);
    model_keys: the model's keys that set its size (its entry's ``size_keys``), named in the advice
    of :func:`check_fits`; not a figure, so not in :meth:`as_dict`.
    """

    params: int
    opt_state: int
    temp: int
    batch: int
    model_keys: tuple[str, ...] = ()
    model_state: int = 0
    ema: int = 0

    @property
    def total(self) -> int:
        """params + opt_state + model_state + ema + temp."""
        return self.params + self.opt_state + self.model_state + self.ema + self.temp

    def as_dict(self) -> dict:
        """The figures (params, opt_state, model_state, ema, temp, batch) and the total, in bytes."""
        return {"params": self.params, "opt_state": self.opt_state, "model_state": self.model_state,
                "ema": self.ema, "temp": self.temp, "batch": self.batch, "total": self.total}


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def member_memory(model, tx, l2: float, image_size: int, batch_per_device: int,
                  ema_decay: float = 0.0) -> MemberMemory:
    """One member's memory on one device at `batch_per_device` images (see the module docstring).

    `model` is a registered model's module (:func:`imgclf_jax.models.entry_for` gives the keys
    that set its size, for the advice when it does not fit); `l2` its ``model.l2``; `ema_decay`
    ``train.ema_decay`` (on: the state also holds the averaged variables). The train step compiled for the
    estimate is the real one, so a model with BatchNorm counts its statistics and what their
    backward pass keeps.
    """
    state = jax.eval_shape(lambda key: steps.create_train_state(model, tx, key, image_size, ema_decay),
                           jax.random.key(0))
    batch = {
        "image": jax.ShapeDtypeStruct((batch_per_device, image_size, image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_per_device,), jnp.int32),
        "mask": jax.ShapeDtypeStruct((batch_per_device,), jnp.bool_),
    }
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=l2, ema_decay=ema_decay),
                   donate_argnums=(0,))
    analysis = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0
    return MemberMemory(params=_nbytes(state.params), opt_state=_nbytes(state.opt_state), temp=temp,
                        batch=batch_per_device, model_keys=tuple(entry_for(model).size_keys),
                        model_state=_nbytes(state.model_state), ema=_nbytes(state.ema))


def ensemble_need_bytes(member: MemberMemory, num_members: int, keeps_best: bool) -> int:
    """Bytes per device for `num_members` members (plus each member's best weights when `keeps_best`)."""
    return num_members * (member.total + (member.params + member.model_state if keeps_best else 0))


def available_bytes(devices) -> tuple[int | None, str]:
    """(bytes free to one device, what was measured); None when nothing can be measured.

    GPU/TPU: the smallest ``bytes_limit - bytes_in_use`` over `devices`. CPU: the
    host's MemAvailable (/proc/meminfo), less :data:`HOST_PROCESS_BYTES` for the
    process itself, divided by the number of devices, which share it.
    """
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return int(free), f"free memory of {devices[0].platform} device"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        host = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None, "unknown"
    host = max(host - HOST_PROCESS_BYTES, 0)
    return host // len(devices), f"available host RAM less 1 GiB for the process, / {len(devices)} device(s)"


def check_fits(member: MemberMemory, num_members: int, keeps_best: bool, devices,
               image_size: int | None = None, data_bytes: int = 0) -> dict:
    """Raises ConfigError when `num_members` members cannot fit; returns the figures otherwise.

    A plain run is ``num_members=1``. `image_size` (pixels) is only quoted in the message.
    `data_bytes`: the training split held on every device (``data.on_device``:
    :func:`imgclf_jax.data.device_augment.table_bytes`), added to the need; 0 = none.

    Raises:
      ConfigError: the estimate (:func:`ensemble_need_bytes`) exceeds what :func:`available_bytes` reports.
        The message gives the figures and what to reduce: the largest K that fits when at least one
        member does; else the batch size (the step's temporaries grow about linearly with it; the
        message says about which per-device batch would fit), the image size or the model.
    """
    need = ensemble_need_bytes(member, num_members, keeps_best) + data_bytes
    free, what = available_bytes(devices)
    figures = {"member": member.as_dict(), "num_members": num_members, "need_bytes": need,
               "available_bytes": free, "available": what, "data_bytes": data_bytes}
    if free is None or need <= free:
        return figures
    if data_bytes and need - data_bytes <= free:
        raise ConfigError(f"data.on_device=true puts the training split on every device ({data_bytes / GIB:.2f} "
                          f"GiB as uint8), which with training's {(need - data_bytes) / GIB:.2f} GiB needs "
                          f"{need / GIB:.2f} GiB per device but only {free / GIB:.2f} GiB is free ({what}): "
                          "set --config.data.on_device=false (batches then come from the host), or a smaller "
                          "data.image_size or data.max_train_examples")
    if data_bytes:  # the advice below is about training's own share
        need, free = need - data_bytes, free - data_bytes
        what += f", less {data_bytes / GIB:.2f} GiB for the training split on the device (data.on_device)"
    per = ensemble_need_bytes(member, 1, keeps_best)
    best = member.params + member.model_state
    parts = (f"params {member.params / GIB:.2f}, optimizer state {member.opt_state / GIB:.2f}, "
             + (f"model state (BatchNorm statistics) {member.model_state / GIB:.2f}, " if member.model_state else "")
             + (f"EMA weights {member.ema / GIB:.2f}, " if member.ema else "")
             + f"step temporaries at batch {member.batch} per device {member.temp / GIB:.2f}"
             f"{f', best weights copy {best / GIB:.2f}' if keeps_best else ''}")
    if num_members > 1:
        head = (f"ensemble.num_members={num_members} needs about {need / GIB:.2f} GiB per device "
                f"({per / GIB:.2f} GiB per member: {parts})")
    else:
        head = f"training needs about {need / GIB:.2f} GiB per device ({parts})"
    head += f" but only {free / GIB:.2f} GiB is free ({what})"
    if num_members > 1 and free >= per:
        raise ConfigError(f"{head}; use ensemble.num_members <= {free // per} or a smaller train.batch_size")
    members = f"{num_members} members' " if num_members > 1 else ""
    fixed = num_members * (member.total - member.temp + (member.params + member.model_state if keeps_best else 0))
    image = f"data.image_size (now {image_size})" if image_size else "data.image_size"
    keys = ", ".join(f"model.{key}" for key in member.model_keys) or "its model.* keys"
    if fixed >= free or not member.temp:
        advice = (f"the {members}weights and optimizer state alone need {fixed / GIB:.2f} GiB: use a smaller "
                  f"model ({keys})"
                  + (", or fewer ensemble.num_members" if num_members > 1 else "")
                  + f", or a smaller {image} (the dense layers grow with it)")
    else:
        fits = int((free - fixed) / (num_members * member.temp / member.batch))
        advice = (f"reduce train.batch_size (the step's temporaries grow with it: about {fits:,} images per "
                  f"device would fit, {member.batch:,} asked), or {image}, or the model "
                  f"({keys})"
                  + (", or ensemble.num_members" if num_members > 1 else ""))
    raise ConfigError(f"{head}; {advice}")
