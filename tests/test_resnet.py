"""The ResNet family (imgclf_jax.models.resnet): shapes, parameter counts, BatchNorm modes, masked statistics.

Tiny widths (4, 8) on 16x16 images, so each test takes a second or two on a CPU. The module is checked
with direct ``apply`` calls; the train step's use of it (batch_stats in the train state) is the steps'.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import config as config_lib, memory, summary
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import (MODELS, ResNet, create_model, entry_for, l2_penalty, layer_specs, model_entry,
                               regularized_kernels)
from imgclf_jax.models.resnet import BasicBlock, ResNet9, ResNet18

SIZE, NUM_CLASSES = 16, 3

# The tiny config of most tests: stem 4 3x3/1, stage0 one block 4->4 stride 1 (identity shortcut),
# stage1 one block 4->8 stride 2 (projection shortcut).
TINY = {"model.stem_width": 4, "model.stem_kernel": 3, "model.stem_stride": 1, "model.widths": (4, 8),
        "model.depths": (1, 1), "model.strides": (1, 2)}


def _config(name="resnet", **changes):
    c = config_lib.base_config()
    config_lib.select_model(c, name)
    for key, value in changes.items():
        parent, leaf = config_lib._lookup(c, key)
        parent[leaf] = value
    config_lib.validate(c)
    return c


def _tiny(**changes):
    return _config(**{**TINY, **changes})


def _images(n, seed=0, size=SIZE):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)), jnp.float32)


def _init(model, size=SIZE, seed=0):
    return model.init(_key(seed), jnp.zeros((1, size, size, 3)), train=False)


def _key(seed):
    # The 'rbg' generator: the same init distributions, compiled in about half threefry's time on XLA:CPU.
    return jax.random.key(seed, impl="rbg")


def test_tiny_param_counts_flops_and_state_by_hand():
    c = _tiny()
    model = create_model(c.model, NUM_CLASSES)
    rows = layer_specs(c.model, SIZE, NUM_CLASSES)
    # stem_conv 3*3*3*4 = 108, stem_bn 2*4 = 8;
    # stage0_block0 (4->4): conv1 3*3*4*4 = 144, bn1 8, conv2 144, bn2 8 (identity shortcut: nothing);
    # stage1_block0 (4->8, stride 2): conv1 3*3*4*8 = 288, bn1 16, conv2 3*3*8*8 = 576, bn2 16,
    #   proj_conv 1*1*4*8 = 32, proj_bn 16;  logits 8*3 + 3 = 27.  Total 108+8+304+944+27 = 1391.
    expected = {"stem_conv": 108, "stem_bn": 8,
                "stage0_block0/conv1": 144, "stage0_block0/bn1": 8, "stage0_block0/conv2": 144,
                "stage0_block0/bn2": 8,
                "stage1_block0/conv1": 288, "stage1_block0/bn1": 16, "stage1_block0/conv2": 576,
                "stage1_block0/bn2": 16, "stage1_block0/proj_conv": 32, "stage1_block0/proj_bn": 16,
                "logits": 27}
    assert {r.name: r.params for r in rows if r.params} == summary.param_counts(model, SIZE) == expected
    assert sum(expected.values()) == 1391
    # Multiply-adds: stem 16*16*108 = 27,648; stage0 convs 2 * 16*16*144 = 73,728; stage1 at 8x8:
    # conv1 64*288 = 18,432, conv2 64*576 = 36,864, proj 64*32 = 2,048; logits 8*3 = 24: 158,744.
    assert summary.count_flops(c.model, SIZE, NUM_CLASSES) == 2 * 158_744
    # batch_stats: mean + var per BN channel: 2 * (4 + 4 + 4 + 8 + 8 + 8) = 72 values, not params.
    assert summary.state_counts(model, SIZE) == {"batch_stats": 72}
    assert [r.output_shape for r in rows if r.name.endswith("add")] == [(16, 16, 4), (8, 8, 8)]
    assert rows[-2].output_shape == (8,) and rows[-2].kind == "global_avg_pool"


def test_resnet18_has_torchvisions_parameter_count():
    c = _config("resnet18")
    # torchvision resnet18 at 1000 classes: 11,689,512. At 5 classes the fc loses 512*995 + 995 = 510,435.
    assert sum(summary.param_counts(create_model(c.model, 1000), 224).values()) == 11_689_512
    rows = layer_specs(c.model, 224, 5)
    assert sum(r.params for r in rows) == sum(summary.param_counts(create_model(c.model, 5), 224).values()) \
        == 11_689_512 - 510_435
    # Its stem (7x7/2 + 3x3/2 max pool) and stages: 224 -> 112 -> 56 -> 56, 28, 14, 7.
    shapes = {r.name: r.output_shape for r in rows}
    assert shapes["stem_conv"] == (112, 112, 64) and shapes["stem_pool"] == (56, 56, 64)
    assert [shapes[f"stage{i}_block1/add"] for i in range(4)] == [(56, 56, 64), (28, 28, 128), (14, 14, 256),
                                                                   (7, 7, 512)]
    # 1.81 G multiply-adds at 224 (torchvision's published 1.81 "GFLOPS" are multiply-adds).
    assert summary.count_flops(c.model, 224, 1000) / 2e9 == pytest.approx(1.814, abs=1e-3)


def test_variants_are_partials_and_entries_with_their_own_defaults():
    assert {"resnet", "resnet18", "resnet9"} <= set(MODELS.names())
    c18 = _config("resnet18")
    assert create_model(c18.model, 5) == ResNet18(num_classes=5)
    assert create_model(_config("resnet9").model, 5) == ResNet9(num_classes=5)
    assert create_model(_config("resnet").model, 5) == ResNet(num_classes=5)
    assert model_entry(c18.model).takes_mask and not MODELS["branched_cnn"].takes_mask
    assert entry_for(ResNet18(num_classes=5)).regularized_kernels is MODELS["resnet18"].regularized_kernels
    # A variant's keys are overridable after selecting it (model.name is applied first).
    c = config_lib.base_config()
    config_lib.apply_overrides(c, [("model.widths", "(8, 16, 32, 64)"), ("model.name", "resnet18")])
    config_lib.validate(c)
    assert tuple(c.model.widths) == (8, 16, 32, 64) and c.model.stem_kernel == 7
    # ResNet-9 at 32x32, 10 classes: the DAWNBench net's 6.57M parameters (32 -> 16 -> 8 -> 4 -> global max).
    r9 = _config("resnet9").model
    assert sum(r.params for r in layer_specs(r9, 32, 10)) == 6_573_130
    assert [r.output_shape for r in layer_specs(r9, 32, 10) if r.kind == "max_pool"] == \
        [(16, 16, 128), (8, 8, 256), (4, 4, 512)]


def _block_outputs(model, size):
    """{submodule name: output shape[1:]} of the module's forward on size x size images (flax's
    capture_intermediates, under jax.eval_shape: nothing is compiled or run)."""

    def forward(key, images):
        variables = model.init(key, images, train=False)
        return model.apply(variables, images, train=False, capture_intermediates=True, mutable=["intermediates"])

    logits, state = jax.eval_shape(forward, jax.random.key(0), jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert logits.shape == (2, NUM_CLASSES)
    return {name: value["__call__"][0].shape[1:] for name, value in state["intermediates"].items()
            if name != "__call__"}


@pytest.mark.parametrize("downsample", ["stride", "max_pool"])
def test_downsampling_shapes_match_the_module(downsample):
    # 15x15, strides (2, 2): 'stride' rounds up (15 -> 8 -> 4), 'max_pool' rounds down (15 -> 7 -> 3).
    c = _tiny(**{"model.downsample": downsample, "model.strides": (2, 2),
                 "model.depths": (1, 1) if downsample == "stride" else (1, 0)})
    model = create_model(c.model, NUM_CLASSES)
    outputs = _block_outputs(model, 15)
    rows = {r.name: r.output_shape for r in layer_specs(c.model, 15, NUM_CLASSES)}
    if downsample == "stride":
        assert outputs["stage0_block0"] == rows["stage0_block0/add"] == (8, 8, 4)
        assert outputs["stage1_block0"] == rows["stage1_block0/add"] == (4, 4, 8)
        assert "stage0_conv" not in outputs
    else:
        assert outputs["stage0_conv"] == rows["stage0_conv"] == (15, 15, 4)
        assert rows["stage0_pool"] == (7, 7, 4) and outputs["stage0_block0"] == rows["stage0_block0/add"] == (7, 7, 4)
        assert outputs["stage1_conv"] == rows["stage1_conv"] == (7, 7, 8) and rows["stage1_pool"] == (3, 3, 8)
        assert "stage1_block0" not in outputs  # depth 0: conv + pool only
    assert {r.name: r.params for r in layer_specs(c.model, 15, NUM_CLASSES) if r.params} == \
        summary.param_counts(model, 15)


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, jitted train apply, jitted eval apply) of the tiny config (one init for the file)."""
    model = create_model(_tiny(**{"model.bn_momentum": 0.75}).model, NUM_CLASSES)
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(functools.partial(model.apply, train=False, mutable=["batch_stats"]))
    return model, _init(model), train, evaluate


def test_masked_batch_norm_ignores_padding_rows(tiny):
    _, variables, train, _ = tiny
    real = _images(3, seed=1)
    padding = 1000.0 * _images(2, seed=2) - 300.0  # arbitrary pixel values, far from the real rows'
    batch = jnp.concatenate([real[:2], padding[:1], real[2:], padding[1:]])
    mask = jnp.array([True, True, False, True, False])
    logits, stats = train(variables, batch, mask=mask)
    alone_logits, alone_stats = train(variables, real)  # mask None: every row
    np.testing.assert_allclose(logits[mask], alone_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(alone_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without the mask the padding rows do enter the statistics (so the check above can fail).
    _, unmasked = train(variables, batch, mask=jnp.ones(5, bool))
    assert not np.allclose(unmasked["batch_stats"]["stem_bn"]["mean"], alone_stats["batch_stats"]["stem_bn"]["mean"])


def test_train_updates_running_averages_and_eval_uses_them(tiny):
    model, variables, train, evaluate = tiny
    images = _images(3, seed=3)
    _, new = train(variables, images)
    # stem_bn: running = 0.75 * init + 0.25 * batch statistics of the stem conv's output (init mean 0, var 1).
    kernel = variables["params"]["stem_conv"]["kernel"]
    conv = jax.lax.conv_general_dilated(images, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    stem = new["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stem["mean"], 0.25 * conv.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stem["var"], 0.75 + 0.25 * conv.var((0, 1, 2)), rtol=1e-5, atol=1e-6)
    # Eval: uses the running averages (a row's logits do not depend on the other rows) and changes nothing.
    trained = {"params": variables["params"], **new}
    logits, same = evaluate(trained, images)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)
    others = images.at[1:].set(_images(2, seed=4))
    np.testing.assert_allclose(evaluate(trained, others)[0][0], logits[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, evaluate(variables, images)[0], atol=1e-4)  # other running statistics
    # Train mode: the rows share the batch's statistics, so a row's logits depend on the others.
    assert not np.allclose(train(variables, images)[0][0], train(variables, others)[0][0], atol=1e-4)


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 4)).clip(0), jnp.float32)  # post-ReLU, >= 0
    identity = BasicBlock(4, 1, zero_init_residual=True)
    v = identity.init(_key(0), x, train=False)
    np.testing.assert_array_equal(identity.apply(v, x, train=False), x)  # relu(0 + x) = x
    assert not np.allclose(BasicBlock(4, 1).apply(BasicBlock(4, 1).init(_key(0), x, train=False), x,
                                                  train=False), x)
    # Projection shortcut: relu(proj_bn(proj_conv(x))); at init the BN (eval) divides by sqrt(1 + eps).
    projection = BasicBlock(8, 2, zero_init_residual=True)
    v = projection.init(_key(0), x, train=False)
    kernel = v["params"]["proj_conv"]["kernel"]
    shortcut = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((0, 0), (0, 0)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(projection.apply(v, x, train=False), jax.nn.relu(shortcut), rtol=1e-5, atol=1e-6)
    # In the whole net: every block's bn2 scale is 0, every other BN scale 1.
    params = _init(create_model(_tiny(**{"model.zero_init_residual": True}).model, NUM_CLASSES))["params"]
    scales = {f"{block}/{bn}": np.asarray(params[block][bn]["scale"]) for block in params if "block" in block
              for bn in params[block] if "bn" in bn}
    assert set(scales) == {"stage0_block0/bn1", "stage0_block0/bn2", "stage1_block0/bn1", "stage1_block0/bn2",
                           "stage1_block0/proj_bn"}
    assert all((s == 0).all() if k.endswith("bn2") else (s == 1).all() for k, s in scales.items())
    assert (np.asarray(params["stem_bn"]["scale"]) == 1).all()


def test_l2_covers_every_conv_and_dense_kernel_not_batch_norm(tiny):
    c = _tiny()
    model, variables, _, _ = tiny
    params = variables["params"]
    kernels = regularized_kernels(params, model=model)
    assert set(kernels) == {r.name for r in layer_specs(c.model, SIZE, NUM_CLASSES) if r.kind in ("conv", "dense")}
    ones = jax.tree.map(jnp.ones_like, params)  # every value 1: the L2 sum is the number of kernel weights
    # 108 + 144 + 144 + 288 + 576 + 32 + 24 = 1316 kernel weights (the 1391 params less 75 BN/bias values).
    assert float(l2_penalty(ones, 0.5, model=model)) == pytest.approx(0.5 * 1316)


@pytest.mark.parametrize("changes, key", [
    ({"model.depths": (1,)}, "model.depths"),
    ({"model.strides": (1, 2, 2)}, "model.strides"),
    ({"model.widths": (4, 0)}, "model.widths"),
    ({"model.depths": (1, 0)}, "model.depths"),  # a 'stride' stage needs a block to stride
    ({"model.strides": (1, 0)}, "model.strides"),
    ({"model.stem_kernel": 4}, "model.stem_kernel"),
    ({"model.stem_pool": "avg"}, "model.stem_pool"),
    ({"model.downsample": "conv"}, "model.downsample"),
    ({"model.pool": "sum"}, "model.pool"),
    ({"model.bn_momentum": 1.0}, "model.bn_momentum"),
    ({"model.bn_epsilon": 0.0}, "model.bn_epsilon"),
    ({"model.fast_path": "on"}, "model.fast_path"),
])
def test_impossible_values_are_one_line_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as e:
        _tiny(**changes)
    message = str(e.value)
    assert message.startswith(f"config key '{key}' must be") and "\n" not in message


def test_a_max_pool_stage_too_small_for_the_image_is_refused():
    ok = {"model.downsample": "max_pool", "model.depths": (1, 0), "model.strides": (2, 2)}
    _tiny(**ok)  # 16 -> 8 -> 4
    with pytest.raises(ConfigError, match=r"the 4x4 max pool of stage1 gets a 2x2 input from a 8x8 image and "
                                          r"leaves no pixels; change model.strides or data.image_size"):
        _tiny(**{**ok, "model.strides": (4, 4), "data.image_size": 8})
    _tiny(**{"model.fast_path": "off"})  # 'off' and 'auto' are fine: there is nothing to switch


def test_summary_and_memory_of_a_tiny_resnet(tmp_path, capsys):
    # Needs the train step to apply BatchNorm models (mutable batch_stats, mask=): the lead's steps.py work.
    lines = [f"c.model.{k.split('.', 1)[1]} = {v!r}" for k, v in TINY.items()]
    path = tmp_path / "tiny_resnet.py"
    path.write_text("from imgclf_jax.config import base_config, select_model\n\n\ndef get_config():\n"
                    "    c = base_config()\n    select_model(c, 'resnet')\n"
                    + "".join(f"    {line}\n" for line in lines)
                    + f"    c.data.image_size = {SIZE}\n    c.train.batch_size = 4\n    return c\n")
    assert summary.main(["--config", str(path), "--num_classes", str(NUM_CLASSES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: model 'resnet', input 16x16x3, 3 classes, logits [1, 3]"
    assert ["stage1_block0/proj_bn", "stage1", "8x8x8", "16", "-"] in [line.split() for line in out]
    assert "total: 1,391 parameters, 0.32 MFLOPs per image (forward) (+ 72 non-trainable values: batch_stats)" \
        in out
    figures = json.loads(out[-1])
    assert (figures["num_params"], figures["num_state"], figures["flops_per_image"]) == (1391, 72, 317_488)
    member = figures["memory_per_member_bytes"]
    assert member["params"] == 1391 * 4 and member["model_state"] == 72 * 4
    # The step keeps the activations for the backward pass, BN's included: at least the 16x16x4 stem
    # conv output, its BN output and the block's 4 more 16x16x4 maps, per image, in float32.
    assert member["temp"] >= 4 * (6 * 16 * 16 * 4) * 4


def test_the_memory_estimate_counts_batch_norm_state():
    c = _tiny()
    model = create_model(c.model, NUM_CLASSES)
    m = memory.MemberMemory(params=1391 * 4, opt_state=2 * 1391 * 4, temp=10_000, batch=4,
                            model_state=4 * sum(summary.state_counts(model, SIZE).values()))
    assert m.model_state == 288 and m.total == 1391 * 4 * 3 + 10_000 + 288
    assert memory.ensemble_need_bytes(m, 2, keeps_best=True) == 2 * (m.total + 1391 * 4 + 288)
    assert summary.state_counts(MODELS["branched_cnn"].create(config_lib.base_config().model, 3), SIZE) == {}
