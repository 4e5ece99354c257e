"""The reference models and optimizers in Keras 3, built from the same config as imgclf_jax's.

These are the Keras twins of :class:`imgclf_jax.models.BranchedCNN`, written
as the original notebooks wrote them (``../shared/seed-attempts.md``):
``Conv2D(filters, k, padding, activation='relu')``, ``MaxPooling2D(2)``,
``Dropout``, ``Flatten``; the side branch ``Conv2D`` -> ``AveragePooling2D(p)``
-> ``Flatten`` concatenated after the main branch; ``Dense(units, 'relu')``
with dropouts; ``Dense(num_classes, 'softmax')``. With ``model.l2 > 0`` every
conv and hidden dense layer gets ``kernel_regularizer=L2(l2)`` (not the output
layer). Keras's default initializers (glorot-uniform kernels, zero biases)
are the ones imgclf_jax copies. The optimizer is ``keras.optimizers.Adam``
(epsilon 1e-7) with ``ExponentialDecay`` when the config says so; the loss is
categorical cross-entropy on the softmax output, with accuracy as metric.

Import this module only after choosing the backend (``KERAS_BACKEND``):
Keras fixes it on import.
"""

from __future__ import annotations

from typing import Any

import keras


def build(model_config: Any, num_classes: int, image_size: int) -> keras.Model:
    """The Keras model of a config's ``model`` section, on float32[B, image_size, image_size, 3] inputs.

    Returns:
      An uncompiled functional ``keras.Model`` mapping images to float32[B, num_classes]
      softmax probabilities, with the same parameter count as
      ``imgclf_jax.models.create_model(model_config, num_classes)``.
    """
    m = model_config
    l2 = float(m.l2)

    def regularizer():
        return keras.regularizers.L2(l2) if l2 > 0 else None

    images = keras.Input((image_size, image_size, 3), name="image")
    x = images
    layers = zip(m.conv_filters, m.conv_kernel_sizes, m.conv_paddings, m.conv_pools, m.conv_dropouts)
    for i, (filters, kernel, padding, pool, rate) in enumerate(layers):
        x = keras.layers.Conv2D(int(filters), int(kernel), padding=str(padding).lower(), activation="relu",
                                kernel_regularizer=regularizer(), name=f"conv_{i}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
        if rate > 0:
            x = keras.layers.Dropout(float(rate), name=f"conv_dropout_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if m.side_filters > 0:
        s = keras.layers.Conv2D(int(m.side_filters), int(m.side_kernel_size), padding="same",
                                activation="relu", kernel_regularizer=regularizer(), name="side_conv")(images)
        s = keras.layers.AveragePooling2D(int(m.side_pool_size), name="side_pool")(s)
        s = keras.layers.Flatten(name="side_flatten")(s)
        x = keras.layers.Concatenate(name="concat")([x, s])
    for i, (units, rate) in enumerate(zip(m.dense_units, m.dense_dropouts)):
        x = keras.layers.Dense(int(units), activation="relu", kernel_regularizer=regularizer(),
                               name=f"dense_{i}")(x)
        if rate > 0:
            x = keras.layers.Dropout(float(rate), name=f"dense_dropout_{i}")(x)
    probabilities = keras.layers.Dense(int(num_classes), activation="softmax", name="logits")(x)
    return keras.Model(images, probabilities, name="branched_cnn")


def build_optimizer(optimizer_config: Any) -> keras.optimizers.Optimizer:
    """Keras's Adam of a config's ``optimizer`` section (constant rate or ``ExponentialDecay``).

    Only 'keras_adam' and 'adam' configs are accepted (the Keras optimizer is
    Adam; the epsilon placement of 'adam' differs, its speed does not).

    Raises:
      ValueError: another optimizer or schedule.
    """
    o = optimizer_config
    if o.name not in ("keras_adam", "adam"):
        raise ValueError(f"no Keras twin for optimizer.name={o.name!r}")
    if o.schedule == "constant":
        lr = float(o.learning_rate)
    elif o.schedule == "exponential_decay":
        lr = keras.optimizers.schedules.ExponentialDecay(
            float(o.learning_rate), int(o.decay_steps), float(o.decay_rate), staircase=bool(o.staircase))
    else:
        raise ValueError(f"no Keras twin for optimizer.schedule={o.schedule!r}")
    return keras.optimizers.Adam(learning_rate=lr, beta_1=float(o.b1), beta_2=float(o.b2),
                                 epsilon=float(o.eps))


def build_compiled(config: Any, num_classes: int, image_size: int) -> keras.Model:
    """:func:`build` compiled as the notebooks compiled it: Adam, categorical cross-entropy, accuracy.

    ``jit_compile`` is left at Keras's default ('auto': XLA on JAX, none on
    TensorFlow on a CPU-only machine, XLA where TensorFlow sees a GPU).
    """
    model = build(config.model, num_classes, image_size)
    model.compile(optimizer=build_optimizer(config.optimizer), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model
