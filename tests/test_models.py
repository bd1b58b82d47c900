"""The paper's architectures: exact Appendix C parameter counts and one logit per image."""

import pytest
import torch
from omegaconf import OmegaConf
from torchinfo import summary

from skinclf.config import compose_config
from skinclf.errors import SkinclfError
from skinclf.models import build_model, check_model_config
from skinclf.models.layers import Dropout, Flatten, LayerNorm

# Paper Appendix C: total parameters and torchinfo mult-adds (G) at input (64, 3, 128, 128).
APPENDIX_C = {
    "baseline": (8_408_257, 6.33),
    "batch_norm": (8_408_449, 6.33),
    "group_norm": (8_408_449, 6.33),
    "layer_norm": (9_981_121, 6.43),
    "augmented": (8_408_257, 6.33),
    "resnet": (2_170_401, 2.49),
    "res_aug": (2_170_401, 2.49),
}


@pytest.mark.parametrize("name", APPENDIX_C)
def test_parameter_count_and_mult_adds_match_the_paper(name):
    model = build_model(compose_config([f"model={name}"]).model)
    params, gmacs = APPENDIX_C[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
    stats = summary(model, input_size=(64, 3, 128, 128), verbose=0, device="cpu")
    assert round(stats.total_mult_adds / 1e9, 2) == gmacs


def test_group_counts_and_dropout_rates_are_the_papers():
    # Neither changes a parameter count or mult-adds, so the Appendix C check cannot see them.
    # GroupNorm: groups of 8 channels (paper section 2): 4 groups of conv 1's 32, 8 of conv 2's 64.
    group_norm = build_model(compose_config(["model=group_norm"]).model)
    assert [m.num_groups for m in group_norm.modules() if isinstance(m, torch.nn.GroupNorm)] == [4, 8]
    for name in ("resnet", "res_aug", "vgg16", "vgg16_ft"):
        cfg = compose_config(
            [f"model={name}", "model.pretrained=false"] if "vgg" in name else [f"model={name}"]
        )
        model = build_model(cfg.model)
        rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert rates == ([0.5] if name.startswith("res") else [0.5] * 3), name


@pytest.mark.parametrize("name", APPENDIX_C)
def test_one_logit_per_image(name):
    model = build_model(compose_config([f"model={name}"]).model).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 128, 128))
    assert out.shape == (3, 1)
    assert torch.isfinite(out).all()


def test_augmented_models_share_architecture_but_not_pipeline():
    for plain, augmented in (("baseline", "augmented"), ("resnet", "res_aug")):
        a, b = compose_config([f"model={plain}"]).model, compose_config([f"model={augmented}"]).model
        assert a.arch == b.arch
        assert a.pipeline._target_.endswith("DefaultPipeline")
        assert b.pipeline._target_.endswith("AugmentedPipeline")


def test_pooling_before_relu_is_exactly_the_papers_conv_relu_pool():
    # The models pool before rectifying (cheaper); outputs and gradients must be the paper's.
    torch.manual_seed(0)
    model = build_model(compose_config(["model=batch_norm"]).model)
    conv1, norm1, _, _, conv2, norm2, _, _, *head = list(model)
    relu, pool = torch.nn.ReLU(), torch.nn.MaxPool2d(2)
    textbook = torch.nn.Sequential(conv1, norm1, relu, pool, conv2, norm2, relu, pool, *head)
    x = torch.rand(4, 3, 128, 128)
    outputs, grads = [], []
    for net in (model, textbook):
        net.zero_grad()
        out = net(x)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])


def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    dropout = Dropout(0.3)
    x = torch.ones(64, 64, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    assert torch.allclose(out[kept], torch.tensor(1 / 0.7))
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient: the same mask and scale
    # A seeded draw repeats; evaluation is the identity.
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)
    assert torch.equal(dropout.eval()(x), x)


def test_flatten_matches_torch_and_hands_back_a_channels_last_gradient():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(4, 200)
    ours, theirs = Flatten()(x), torch.nn.Flatten()(x)
    assert torch.equal(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours, x, grad_out)
    (grad_theirs,) = torch.autograd.grad(theirs, x, grad_out)
    assert torch.equal(grad_ours, grad_theirs)
    assert grad_ours.is_contiguous(memory_format=torch.channels_last)


def test_layer_norm_matches_torch_and_keeps_channels_last():
    torch.manual_seed(0)
    ours, theirs = LayerNorm([8, 6, 6]), torch.nn.LayerNorm([8, 6, 6])
    with torch.no_grad():  # distinct per-element weights, so a wrong permutation shows
        theirs.weight.copy_(torch.randn(8, 6, 6))
        theirs.bias.copy_(torch.randn(8, 6, 6))
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(4, 8, 6, 6) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(4, 8, 6, 6)
    out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_ours, out_theirs, atol=1e-5)
    grads_ours = torch.autograd.grad(out_ours, (x, ours.weight, ours.bias), grad_out)
    grads_theirs = torch.autograd.grad(out_theirs, (x, theirs.weight, theirs.bias), grad_out)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # An NCHW input takes torch's own path.
    assert torch.equal(ours(x.detach().contiguous()), theirs(x.detach().contiguous()))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            ["model=baseline", "model.arch.norm=batchnorm"],
            "model.arch.norm='batchnorm': expected one of none",
        ),
        (
            ["model=resnet", "model.arch.dropout=1.5"],
            r"model.arch.dropout=1.5: expected a number in \[0, 1\)",
        ),
        (["model=resnet", "model.arch.dropout=1"], "model.arch.dropout=1: expected"),
        (["model=resnet", "model.arch.dropout=abc"], "model.arch.dropout='abc': expected"),
        (
            ["model=vgg16", "model.pretrained=false", "model.arch.dropout=-0.1"],
            "model.arch.dropout=-0.1: expected",
        ),
    ],
)
def test_bad_model_options_are_one_clear_error_naming_the_key(overrides, named):
    # A SkinclfError, not a ValueError: only those come through Hydra's instantiate as one line.
    with pytest.raises(SkinclfError, match=f"^{named}"):
        build_model(compose_config(overrides).model)


def test_model_config_targets_are_checked_as_instantiate_resolves_them():
    # The walk read the config unresolved: `_target_: ${..cls}` (a user's own config) was refused
    # as no package.module.Class, and a node put in by interpolation escaped the check.
    cfg = OmegaConf.create(
        {
            "model": {
                "name": "mine",
                "cls": "skinclf.models.simple_cnn.SimpleCNN",
                "arch": {"_target_": "${..cls}"},
                "pipeline": {"_target_": "skinclf.data.pipeline.DefaultPipeline"},
            },
            "elsewhere": {"_target_": "builtins.open", "file": "victim"},
        }
    )
    check_model_config(cfg.model, "here")
    cfg.model.arch.norm = "${elsewhere}"
    with pytest.raises(
        SkinclfError, match=r"here: model\.arch\.norm\._target_=builtins\.open: is a builtin_"
    ):
        check_model_config(cfg.model, "here")
    # The model's other keys are never instantiated: not resolved (${hydra:...} needs a Hydra app).
    cfg.model.arch.norm = None
    cfg.model.tag = "${hydra:runtime.choices.model}"
    check_model_config(cfg.model, "here")
