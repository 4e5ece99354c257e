"""Models by name: a second model family, registered here, goes through everything the branched CNN does.

The family is a 1-conv net with its own keys (``model.features``, ``model.kernel_size``) and its own L2
kernel list (the conv only, not the head); it is registered for these tests and unregistered after.
"""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgclf_jax import cli, config as config_lib, memory, steps, summary
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import (
    MODELS,
    BranchedCNN,
    LayerSpec,
    ModelEntry,
    create_model,
    entry_for,
    l2_penalty,
    layer_specs,
    model_entry,
    regularized_kernels,
)
from imgclf_jax.models.base import require
from imgclf_jax.optim import create_optimizer

from conftest import ROOT


class OneConv(nn.Module):
    """Conv (k x k, valid) -> ReLU -> global mean -> Dense(num_classes) 'head'."""

    num_classes: int
    features: int = 4
    kernel_size: int = 3

    @nn.compact
    def __call__(self, images, *, train: bool):
        k = self.kernel_size
        x = nn.relu(nn.Conv(self.features, (k, k), padding="VALID", name="conv")(images))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def one_conv_config():
    m = ml_collections.ConfigDict()
    m.features = 4
    m.kernel_size = 3
    return m


def one_conv_validate(m, image_size):
    require(m.features >= 1, m, "features", ">= 1")
    require(1 <= m.kernel_size <= image_size, m, "kernel_size", f"in [1, data.image_size={image_size}]")


def one_conv_specs(m, image_size, num_classes):
    f, k = m.features, m.kernel_size
    s = image_size - k + 1
    return [LayerSpec("conv", "conv", (s, s, f), k * k * 3 * f + f, s * s * k * k * 3 * f, "main"),
            LayerSpec("mean", "avg_pool", (f,), 0, 0, "main"),
            LayerSpec("head", "dense", (num_classes,), f * num_classes + num_classes, f * num_classes, "head")]


ONE_CONV = ModelEntry(
    name="one_conv",
    module_type=OneConv,
    config=one_conv_config,
    validate=one_conv_validate,
    create=lambda m, num_classes: OneConv(num_classes, int(m.features), int(m.kernel_size)),
    layer_specs=one_conv_specs,
    regularized_kernels=lambda params: {"conv": (params.get("params", params))["conv"]["kernel"]},
    size_keys=("features",),
)

VALID_KEYS = ("model.compute_dtype, model.fast_path, model.features, model.kernel_size, model.l2, "
              "model.matmul_precision, model.name")


@pytest.fixture
def one_conv():
    MODELS.register("one_conv", ONE_CONV)
    try:
        yield ONE_CONV
    finally:
        MODELS.unregister("one_conv")


def write_config(tmp_path, body):
    path = tmp_path / "one_conv.py"
    path.write_text("from imgclf_jax.config import base_config\n\n\ndef get_config():\n"
                    "    c = base_config()\n" + "".join(f"    {line}\n" for line in body) + "    return c\n")
    return str(path)


def test_a_second_model_family_is_chosen_by_name_with_its_own_strict_section(one_conv, tmp_path):
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.l2", "0.01")
    config_lib.apply_override(c, "model.name", "one_conv")
    assert sorted(c.model.keys()) == ["compute_dtype", "fast_path", "features", "kernel_size", "l2",
                                      "matmul_precision", "name"]
    assert (c.model.features, c.model.kernel_size, c.model.l2) == (4, 3, 0.01)  # own defaults, l2 kept
    config_lib.apply_override(c, "model.features", "6")
    config_lib.validate(c)
    with pytest.raises(ConfigError, match="config key 'model.features' must be >= 1, got 0"):
        config_lib.apply_override(c, "model.features", "0")
        config_lib.validate(c)
    # The branched CNN's keys are not this model's: refused, listing this model's keys.
    with pytest.raises(ConfigError) as e:
        config_lib.apply_override(c, "model.conv_filters", "(8,)")
    assert str(e.value) == ("unknown config key 'model.conv_filters' (did you mean 'model.features'?); "
                            f"valid keys in 'model': {VALID_KEYS}")

    # A config file: its own keys set or left to their defaults, the branched CNN's left at theirs.
    loaded = config_lib.load_config_file(write_config(tmp_path, ['c.model.name = "one_conv"',
                                                                 "c.model.features = 5"]))
    assert loaded.model.to_dict() == {"name": "one_conv", "features": 5, "kernel_size": 3, "l2": 0.0,
                                      "fast_path": "auto", "compute_dtype": "float32",
                                      "matmul_precision": "default"}
    path = write_config(tmp_path, ['c.model.name = "one_conv"', "c.model.conv_filters = (8,)"])
    with pytest.raises(ConfigError) as e:
        config_lib.load_config_file(path)
    assert str(e.value) == (f"{path}: unknown config key 'model.conv_filters' (did you mean 'model.features'?); "
                            f"valid keys in 'model': {VALID_KEYS}")
    path = write_config(tmp_path, ['c.model.name = "one_conv"', "c.model.features = 2.5"])
    with pytest.raises(ConfigError, match=f"{path}: config key 'model.features' expects int, got 2.5"):
        config_lib.load_config_file(path)
    # Set in code without select_model: the section is the branched CNN's, and validate says so.
    c = config_lib.base_config()
    c.model.name = "one_conv"
    with pytest.raises(ConfigError, match="config key 'model.conv_dropouts' is not a key of "
                                          "model.name='one_conv'.*config.select_model"):
        config_lib.validate(c)
    config_lib.select_model(c, "one_conv")
    config_lib.validate(c)


def test_a_second_model_family_creates_counts_regularizes_and_trains(one_conv):
    c = config_lib.base_config()
    config_lib.select_model(c, "one_conv")
    c.model.features = 6
    model = create_model(c.model, 3)
    assert type(model) is OneConv and model.features == 6
    assert entry_for(model) is ONE_CONV and model_entry(c.model) is ONE_CONV

    # Layer specs against the real module, and by hand: conv 3*3*3*6 + 6 = 168, head 6*3 + 3 = 21.
    rows = layer_specs(c.model, 12, 3)
    assert {r.name: r.params for r in rows if r.params} == summary.param_counts(model, 12) == \
        {"conv": 168, "head": 21}
    # FLOPs: conv 10*10 outputs * 27 * 6 = 16,200 multiply-adds, head 6 * 3 = 18: 2 * 16,218.
    assert summary.count_flops(c.model, 12, 3) == 32_436

    # L2 from this model's own kernel list (the conv, not the head).
    params = steps.init_params(model, jax.random.key(0), 12)
    params = {"conv": {"kernel": jnp.full_like(params["conv"]["kernel"], 0.5), "bias": params["conv"]["bias"]},
              "head": {"kernel": jnp.full_like(params["head"]["kernel"], 2.0), "bias": params["head"]["bias"]}}
    assert set(regularized_kernels(params, model=model)) == {"conv"}
    # 162 conv weights of 0.5: 162 * 0.25 = 40.5; x 0.01 = 0.405. (The branched CNN's rule, every
    # kernel but 'logits', would add the head's 18 weights of 2.0: 72 more.)
    assert float(l2_penalty(params, 0.01, model=model)) == pytest.approx(0.405, rel=1e-6)
    assert float(l2_penalty(params, 0.01)) == pytest.approx(0.01 * (40.5 + 72.0), rel=1e-6)

    # One jitted train step: finite, and its loss is the cross-entropy plus this model's L2.
    tx, _ = create_optimizer(c.optimizer, steps_per_epoch=1, num_epochs=c.train.num_epochs)
    state = steps.create_train_state(model, tx, jax.random.key(1), 12)
    images = jax.random.uniform(jax.random.key(2), (4, 12, 12, 3))
    batch = {"image": images, "label": jnp.array([0, 1, 2, 1], jnp.int32), "mask": jnp.array([True] * 3 + [False])}
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=0.01))
    new_state, metrics = step(state, batch, jax.random.key(3))
    loss = float(metrics["loss_sum"] / metrics["count"])
    logits = model.apply({"params": state.params}, images, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:3], batch["label"][:3]).mean()
    expected = float(ce + 0.01 * jnp.sum(jnp.square(state.params["conv"]["kernel"])))
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-5)
    assert int(new_state.step) == 1
    assert not np.array_equal(np.asarray(new_state.params["conv"]["kernel"]),
                              np.asarray(state.params["conv"]["kernel"]))
    # The memory check names this model's size keys.
    assert memory.member_memory(model, tx, 0.01, 12, 4).model_keys == ("features",)


def test_summary_prints_a_second_model_family_checked_against_its_module(one_conv, tmp_path, capsys):
    path = write_config(tmp_path, ['c.model.name = "one_conv"', "c.model.features = 5", "c.data.image_size = 12",
                                   "c.train.batch_size = 4"])
    assert summary.main(["--config", path, "--num_classes", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: model 'one_conv', input 12x12x3, 3 classes, logits [1, 3]"
    # conv 3*3*3*5 + 5 = 140, head 5*3 + 3 = 18; FLOPs 2 * (10*10*27*5 + 15) = 27,030.
    assert [line.split()[0] for line in out[3:6]] == ["conv", "mean", "head"]
    assert out[7].startswith("total: 158 parameters, 0.03 MFLOPs per image")
    figures = json.loads(out[-1])
    assert (figures["num_params"], figures["flops_per_image"]) == (158, 27_030)


def test_model_name_overrides_come_first_and_rebuild_the_section(one_conv):
    # Given after a key of the new model, model.name still applies first; l2 is kept.
    args = cli.parse_args(["--config", str(ROOT / "configs/ml6.py"), "--config.model.features=7",
                           "--config.model.l2=0.002", "--config.model.name=one_conv"], workdir=False)
    assert args.config.model.to_dict() == {"name": "one_conv", "features": 7, "kernel_size": 3, "l2": 0.002,
                                           "fast_path": "auto", "compute_dtype": "float32",
                                           "matmul_precision": "default"}
    # Back to the branched CNN: its keys at their defaults (not ml6's), l2 and fast_path kept.
    c = args.config
    config_lib.apply_override(c, "model.fast_path", "off")
    config_lib.apply_override(c, "model.name", "branched_cnn")
    base = config_lib.base_config().model
    assert c.model.to_dict() == {**base.to_dict(), "l2": 0.002, "fast_path": "off"}
    # The same name changes nothing: ml6's model stays ml6's.
    ml6 = config_lib.load_config_file(str(ROOT / "configs/ml6.py"))
    before = ml6.model.to_dict()
    config_lib.apply_override(ml6, "model.name", "branched_cnn")
    assert ml6.model.to_dict() == before and before["conv_filters"] != tuple(base.conv_filters)


def test_an_unknown_model_name_is_one_line_listing_the_registered_names(one_conv, tmp_path):
    message = ("config key 'model.name' must be one of ('branched_cnn', 'resnet', 'resnet18', 'resnet9', "
               "'one_conv'), got 'vit'")
    with pytest.raises(ConfigError) as e:
        config_lib.apply_override(config_lib.base_config(), "model.name", "vit")
    assert str(e.value) == message
    path = write_config(tmp_path, ['c.model.name = "vit"'])
    with pytest.raises(ConfigError) as e:
        config_lib.load_config_file(path)
    assert str(e.value) == f"{path}: {message}"


def test_an_unknown_model_name_on_the_command_line_is_one_line():
    done = subprocess.run([sys.executable, "-m", "imgclf_jax.summary", "--config", "configs/digits.py",
                           "--config.model.name=vit"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "imgclf_jax.summary: error: config key 'model.name' must be one of ('branched_cnn', 'resnet', 'resnet18', "
        "'resnet9'), got 'vit'"]


def test_a_saved_config_without_model_name_is_the_branched_cnn():
    # config.json of a run from before model.name existed: no 'name' in its model section.
    saved = json.loads(json.dumps(config_lib.base_config().model.to_dict()))
    del saved["name"]
    old = ml_collections.ConfigDict(saved)
    model = create_model(old, 5)
    assert type(model) is BranchedCNN and model == create_model(config_lib.base_config().model, 5)
    assert [r.params for r in layer_specs(old, 32, 5)] == \
        [r.params for r in layer_specs(config_lib.base_config().model, 32, 5)]


def test_entry_for_a_module_of_no_registered_model_is_a_type_error():
    with pytest.raises(TypeError, match=r"Dense is not the module of a registered model; registered: "
                                        r"BranchedCNN \(branched_cnn\)"):
        entry_for(nn.Dense(3))


def test_the_banner_names_a_model_by_its_entry(one_conv):
    from imgclf_jax.models import describe_model

    c = config_lib.base_config()
    assert describe_model(c.model) == "conv (32, 64, 128) + dense (256,)"  # the branched CNN's own words
    c.model.side_filters = 8
    assert describe_model(c.model) == "conv (32, 64, 128) + side branch 8 filters + dense (256,)"
    config_lib.select_model(c, "one_conv")
    c.model.features = 6
    assert describe_model(c.model) == "'one_conv' (features 6, kernel_size 3)"  # no describe: name and own keys


def test_a_workdir_of_another_model_family_is_refused_naming_the_family(one_conv, tmp_path):
    from imgclf_jax import report, workdir as workdir_lib

    run = config_lib.base_config()
    config_lib.select_model(run, "one_conv")
    report.write_json(str(tmp_path / "config.json"), run.to_dict())
    workdir_lib.check_workdir(str(tmp_path), run, overwrite=False)  # its own config: accepted (resumes)
    with pytest.raises(ConfigError) as info:
        workdir_lib.check_workdir(str(tmp_path), config_lib.base_config(), overwrite=False)
    message = str(info.value)
    assert "model.name ('one_conv' -> 'branched_cnn')" in message
    assert "conv_filters" not in message and "features" not in message  # the families' own keys: not listed


def test_a_model_without_the_precision_policy_refuses_bfloat16_and_highest(one_conv):
    """one_conv's create reads neither key: a non-default value is refused, never recorded and ignored."""
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.name", "one_conv")
    config_lib.validate(c)  # the defaults pass
    config_lib.apply_override(c, "model.compute_dtype", "bfloat16")
    with pytest.raises(ConfigError, match=r"^config key 'model.compute_dtype' must be 'float32' for "
                                          r"model.name='one_conv' \(its entry does not follow the precision "
                                          r"policy\), got 'bfloat16'$"):
        config_lib.validate(c)
    config_lib.apply_override(c, "model.compute_dtype", "float32")
    config_lib.apply_override(c, "model.matmul_precision", "highest")
    with pytest.raises(ConfigError, match="config key 'model.matmul_precision' must be 'default' for "
                                          "model.name='one_conv'"):
        config_lib.validate(c)
