import pytest
import yaml

from ospo_fast.config import (
    ConfigError,
    OSPOConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    save_config,
)


def test_defaults_follow_spec():
    c = OSPOConfig()
    assert (c.images.guidance_scale, c.images.temperature) == (5.0, 1.0)
    assert (c.masks.skip_layers, c.masks.otsu_scale, c.masks.context) == (5, 0.8, "base")
    assert (c.filter.tau, c.perturb.num_perturbations) == (0.6, 3)
    assert (c.loss.beta, c.loss.gamma_beta_ratio, c.loss.alpha, c.loss.sft_weight) == (5.0, 0.5, 1.0, 2.0)
    assert (c.train.lora_r, c.train.lora_alpha, c.train.lora_dropout) == (64, 128, 0.05)
    assert (c.train.lr, c.train.betas, c.train.min_lr, c.train.warmup_ratio) == (1e-5, [0.9, 0.95], 1e-7, 0.05)
    assert (c.questions.temperature, c.questions.top_p) == (1.2, 0.5)


@pytest.mark.parametrize("name", ["tiny", "janus-pro-1b", "janus-pro-7b"])
def test_presets_load(name):
    assert name in preset_names()
    assert isinstance(load_config(name), OSPOConfig)


def test_round_trip(tmp_path):
    c = load_config("tiny", ["train.lr=3e-4", "loss.normalization=length", "train.betas=[0.8,0.9]"])
    path = save_config(c, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(c)
    assert again.train.lr == 3e-4 and again.loss.normalization == "length" and again.train.betas == [0.8, 0.9]


def test_override_int_to_float_and_nested():
    c = load_config(None, ["loss.beta=2", "seed=7"])
    assert c.loss.beta == 2.0 and isinstance(c.loss.beta, float) and c.seed == 7


@pytest.mark.parametrize("override, words", [
    ("train.nope=1", ["train.nope", "valid keys", "lr"]),
    ("nope.lr=1", ["nope", "valid keys", "train"]),
    ("train.max_steps=1.5", ["train.max_steps", "integer"]),
    ("train.lora=maybe", ["train.lora", "true or false"]),
    ("loss.normalization=mean", ["loss.normalization", "weighted_mean"]),
    ("train.lr", ["section.key=value"]),
    ("train=3", ["section"]),
])
def test_bad_overrides_name_the_value(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_preset():
    with pytest.raises(ConfigError, match="presets"):
        load_config("no-such-preset")


# --- value rules: every field has one, all violations are reported together -------------------------------------

QUOTED = [  # the cases of issue 17: each finished with 0 pairs, did nothing, or ended in a traceback from torch
    ("prompts.num_prompts=-5", "prompts.num_prompts=-5 must be in [1, 10000000]"),
    ("filter.tau=1.5", "filter.tau=1.5 must be in [0, 1]"),
    ("prompts.chunk_size=0", "prompts.chunk_size=0 must be >= 1"),
    ("model.device=tpu", "model.device='tpu' must be auto, cpu, cuda or cuda:N"),
    ("train.betas=[1]", "train.betas=[1.0] must be a list of 2 items in [0, 1)"),
    ("iterations=0", "iterations=0 must be >= 1"),
]


@pytest.mark.parametrize("override, message", QUOTED)
def test_out_of_range_value_names_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value) == message


def test_all_violations_reported_at_once():
    overrides = [o for o, _ in QUOTED] + ["train.nope=1", "train.max_steps=1.5", "prompts.source=file"]
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{len(overrides)} problems in the config:"
    for _, message in QUOTED:
        assert f"  {message}" in lines
    text = str(err.value)
    assert "unknown config key 'train.nope'" in text and "train.max_steps=1.5 must be an integer" in text
    assert "prompts.source=file" in text and "prompts.file=PATH.jsonl" in text


def _config_classes() -> list[type]:
    """Every dataclass reachable from OSPOConfig (its sections), and OSPOConfig itself."""
    import dataclasses

    found, todo = [], [OSPOConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += [f.default_factory for f in dataclasses.fields(cls)
                 if dataclasses.is_dataclass(f.default_factory) and f.default_factory not in found]
    return found


def test_every_field_has_a_rule_and_its_default_passes_it():
    """A new field declared with plain ``field()`` or a bare default fails here: use ``setting(default, rule)``."""
    import dataclasses

    import ospo_fast.config as cfg

    classes = _config_classes()
    module_classes = [c for c in vars(cfg).values()
                      if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__name__.endswith("Config")]
    assert set(module_classes) == set(classes), "a config dataclass is not a section of OSPOConfig"
    for cls in classes:
        instance = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                continue  # a section
            rule = f.metadata.get("rule")
            assert isinstance(rule, cfg.Rule), f"{cls.__name__}.{f.name} has no rule: declare it with setting()"
            assert rule.test(getattr(instance, f.name)), f"{cls.__name__}.{f.name}'s default breaks its rule"


@pytest.mark.parametrize("name", ["tiny", "toy", "janus-pro-1b", "janus-pro-7b"])
def test_presets_are_valid(name):
    from ospo_fast.config import config_problems

    assert config_problems(load_config(name)) == []


@pytest.mark.parametrize("override, ok", [
    ("prompts.top_p=0", False), ("prompts.top_p=1", True), ("images.temperature=0", True),
    ("images.temperature=-1", False), ("masks.gaussian_kernel=4", False), ("masks.gaussian_kernel=3", True),
    ("masks.skip_layers=-1", False), ("masks.otsu_scale=0", False), ("train.lora_dropout=1", False),
    ("train.lr=.nan", False), ("train.lr=.inf", False), ("train.betas=[0.9,0.95,0.99]", False),
    ("train.betas=[0.9,1.0]", False), ("train.warmup_ratio=1", True), ("train.warmup_ratio=1.5", False),
    ("train.min_lr=1e-3", False), ("prompts.categories=[color,nope]", False), ("prompts.categories=[]", False),
    ("prompts.categories=[color,color]", False), ("train.lora_targets=[q_proj,wq]", False),
    ("train.unfreeze=[generation_head]", False), ("train.lora=false", True),
    ("model.device=cuda:1", True), ("model.device=cuda:x", False), ("model.path=", False),
    ("loss.label_smoothing=0.5", False), ("loss.beta=0", False), ("eval.toy_extra_guidance=[1.0,-2]", False),
    ("prompts.max_numeracy=5", False), ("seed=-1", False), ("filter.tau=0", True),
    ("loss.uncond_anchor=-0.1", False), ("loss.uncond_anchor=0.5", True), ("loss.guided_rewards=true", True),
])
def test_range_edges(override, ok):
    if ok:
        load_config("tiny", [override])
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config("tiny", [override])


def test_uncond_anchor_needs_lora():
    with pytest.raises(ConfigError, match=r"loss\.uncond_anchor=0\.5 needs train\.lora=true"):
        load_config("tiny", ["loss.uncond_anchor=0.5", "train.lora=false"])


def test_full_fine_tuning_may_unfreeze():
    assert load_config("tiny", ["train.lora=false", "train.unfreeze=[generation_head]"]).train.unfreeze == [
        "generation_head"]


def test_saved_config_and_python_built_config_are_checked(tmp_path):
    from ospo_fast.stages.context import StageContext

    data = config_to_dict(load_config("tiny"))
    data["filter"]["tau"] = 1.5
    with pytest.raises(ConfigError, match=r"filter\.tau=1\.5 must be in \[0, 1\]"):
        config_from_dict(data)
    config = load_config("tiny")
    config.prompts.chunk_size = 0  # set in Python, after load_config
    with pytest.raises(ConfigError, match="prompts.chunk_size=0"):
        StageContext(config)  # before any model loads


def test_cli_reports_every_bad_value_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import ospo_fast.models
    from ospo_fast.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(ospo_fast.models, "load_janus", no_model)
    code = main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "filter.tau=1.5",
                 "prompts.num_prompts=-5", "model.device=tpu"])
    err = capsys.readouterr().err
    assert code == 2
    for message in ("filter.tau=1.5 must be in [0, 1]", "prompts.num_prompts=-5 must be in [1, 10000000]",
                    "model.device='tpu'"):
        assert message in err


@pytest.mark.parametrize("override, match", [
    ("train.lr=[", "train.lr=\\["), ("prompts.num_prompts=1000000000000", "10000000"),
    ("masks.gaussian_kernel=100001", "odd integer in \\[1, 63\\]"), ("images.guidance_scale=1e300", "\\[0, 1000\\]"),
    ("images.temperature=1e300", "\\[0, 100\\]"), ("prompts.num_prompts=nan", "integer"),
])
def test_out_of_range_and_malformed_values_are_config_errors(override, match):
    """Issue 35's campaign: each was a traceback, a MemoryError or a run that ended with 0 pairs."""
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


@pytest.mark.parametrize("content", [b"model:\n  path: \xff\xfe\n", b"model: [\n"], ids=["not-utf8", "bad-yaml"])
def test_a_broken_preset_file_is_a_config_error(tmp_path, content):
    preset = tmp_path / "mine.yaml"
    preset.write_bytes(content)
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_config(str(preset))
