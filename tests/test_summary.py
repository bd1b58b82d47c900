"""`skinclf summary`: the Appendix C layer tables and totals, printed by the real command."""

import re

import pytest
from omegaconf import OmegaConf

from skinclf.cli import main as cli_main
from skinclf.errors import SkinclfError
from skinclf.summary import model_config, model_names, model_statistics

from conftest import MODELS_THE_META_DEVICE_CANNOT_RUN, users_module

# Paper Appendix C: total parameters and torchinfo mult-adds (G) at input (64, 3, 128, 128).
APPENDIX_C = {
    "baseline": ("8,408,257", "6.33"),
    "batch_norm": ("8,408,449", "6.33"),
    "group_norm": ("8,408,449", "6.33"),
    "layer_norm": ("9,981,121", "6.43"),
    "augmented": ("8,408,257", "6.33"),
    "resnet": ("2,170,401", "2.49"),
    "vgg16": ("119,642,689", "327.71"),
    "res_aug": ("2,170,401", "2.49"),
}


def summary_output(capsys, *args: str) -> str:
    cli_main(["summary", *args])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", APPENDIX_C)
def test_layer_table_prints_the_appendix_totals(name, capsys):
    out = summary_output(capsys, f"model={name}")
    params, gmacs = APPENDIX_C[name]
    assert re.search(rf"^Total params: {params}$", out, re.M)
    assert re.search(rf"^Total mult-adds \(.*G.*\): {gmacs}$", out, re.M)
    trainable = re.search(r"^Trainable params: ([\d,]+)$", out, re.M).group(1)
    if name == "vgg16":  # frozen feature extractor: only the MLP head 25088-4096-512-128-1 trains
        head = [25088, 4096, 512, 128, 1]
        weights_and_biases = sum(i * o + o for i, o in zip(head[:-1], head[1:], strict=True))
        assert int(trainable.replace(",", "")) == weights_and_biases
    else:
        assert trainable == params
    # The Appendix C layout: one row per layer with output shape and parameters.
    assert re.search(r"Conv2d.*\[64, \d+, \d+, \d+\]", out)
    assert re.search(r"Linear.*\[64, 1\]\s+\d+", out)


def test_all_prints_one_line_per_model_in_paper_order(capsys):
    out = summary_output(capsys, "model=all")
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in APPENDIX_C]
    assert [row[0] for row in rows] == [n for n in model_names() if n in APPENDIX_C]
    assert list(APPENDIX_C) == [n for n in model_names() if n in APPENDIX_C]
    for row in rows:
        params, gmacs = APPENDIX_C[row[0]]
        assert row[2] == params and row[-1] == gmacs


def test_pretrained_weights_are_not_fetched_unless_asked():
    assert model_config("vgg16").model.pretrained is False
    assert model_config("vgg16", ["model.pretrained=true"]).model.pretrained is True
    assert "pretrained" not in model_config("baseline").model


def test_a_weights_switch_applies_to_the_models_that_have_weights(capsys, caplog):
    # model=all model.pretrained=...: baseline has no such key, vgg16 has; each gets what applies.
    out = summary_output(capsys, "model=all", "model.pretrained=false")
    assert any(line.startswith("vgg16 ") for line in out.splitlines())
    # The table of a model built without its weights does not warn that training so would differ.
    assert "NOT the paper's setup" not in caplog.text


def test_a_key_only_some_models_have_goes_to_those_under_model_all(capsys):
    # model=all model.freeze=2 was Hydra's bare "Could not override 'model.freeze'".
    out = summary_output(capsys, "model=all", "model.freeze=2")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    single = summary_output(capsys, "model=vgg16_ft", "model.freeze=2")
    trainable = re.search(r"^Trainable params: ([\d,]+)$", single, re.M).group(1)
    assert rows["vgg16_ft"][3] == trainable != rows["vgg16_ft"][2]
    assert rows["baseline"][2:4] == [APPENDIX_C["baseline"][0]] * 2


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["model=nope"], "model=nope"),
        (
            ["model=baseline,resnet"],
            "model=baseline,resnet: unknown model (one model, or all: summary takes no list)",
        ),
        (["model=all", "model.freez=2"], "model.freez: no skinclf config has this key"),
        (["resnet"], "resnet"),
        # A bad model option: a Hydra InstantiationException traceback before.
        (["model=baseline", "model.arch.norm=batchnorm"], "model.arch.norm='batchnorm': expected"),
        (["model=resnet", "model.arch.dropout=1.5"], "model.arch.dropout=1.5: expected"),
        # A key the constructor refuses, a model that fails on 128x128 images: torchinfo's or
        # Hydra's traceback before, where `skinclf train` says it in one line.
        (["model=resnet", "+model.arch.foo=1"], "unexpected keyword argument 'foo'"),
        # Accepted without a word: the table of the unfrozen model, as if model.freeze were set.
        (["model=resnet18", "+model.freez=3"], "model.freez: not a key of the configs (model=resnet18)"),
        (["model=resnet", "trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
        (
            ["model=resnet", "model.arch._target_=torch.nn.Identity"],
            "model=resnet: the model returns (2, 3, 128, 128) for a batch of 2 images",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["summary", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_a_model_the_meta_device_cannot_run_is_counted_on_the_cpu(tmp_path, monkeypatch):
    users_module(tmp_path, monkeypatch, "users_models", MODELS_THE_META_DEVICE_CANNOT_RUN)
    model = {"name": "mine", "arch": {"_target_": "users_models.CropsToTheLesion"}}
    assert model_statistics(OmegaConf.create({"model": model})).total_params == 4
    model["arch"]["_target_"] = "users_models.NoCpuKernel"  # nowhere to run it: one line
    with pytest.raises(
        SkinclfError, match=r"^model=mine: torchinfo cannot run it on the meta device or the CPU \("
    ):
        model_statistics(OmegaConf.create({"model": model}))
