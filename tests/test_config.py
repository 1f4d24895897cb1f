"""ModelConfig reads real DeepSeek config.json files and rejects impossible ones by name."""

from __future__ import annotations

import codecs
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import transformers

from seekstack.config import ConfigError, ModelConfig, preset
from seekstack.infer.params import SamplingParams
from seekstack.schema import read_config_file, shown_value

# The fields of the released DeepSeek-V3 config.json.
DEEPSEEK_V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip


def test_reads_the_released_deepseek_v3_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DEEPSEEK_V3_JSON))
    config = ModelConfig.from_json(path)
    assert config.rope_type == "yarn" and config.rope_factor == 40
    assert config.extra["quantization_config"]["weight_block_size"] == [128, 128]
    assert config.extra["seq_aux"] is True  # unknown fields are kept for the round trip
    expected = preset("deepseek-v3")
    for name in ("hidden_size", "n_routed_experts", "topk_method", "n_group", "q_lora_rank", "rope_scaling"):
        assert getattr(config, name) == getattr(expected, name), name


def test_missing_fields_take_upstream_defaults_of_the_model_type():
    v2 = ModelConfig.from_dict({"model_type": "deepseek_v2", "num_experts_per_tok": 6})
    assert (v2.scoring_func, v2.topk_method, v2.n_routed_experts, v2.norm_topk_prob) == ("softmax", "greedy", 64, False)
    assert v2.num_nextn_predict_layers == 0
    v3 = ModelConfig.from_dict({"model_type": "deepseek_v3"})
    assert (v3.scoring_func, v3.topk_method, v3.n_routed_experts, v3.num_nextn_predict_layers) == (
        "sigmoid",
        "noaux_tc",
        256,
        1,
    )
    # a field transformers' config defines and config.json leaves out is read at transformers' default (the context
    # was DeepSeek-V3's release's 163840, read unscaled: 40x what transformers builds such a config for)
    for reference in (transformers.DeepseekV3Config(), transformers.DeepseekV2Config(num_experts_per_tok=6)):
        ours = ModelConfig.from_dict({"model_type": reference.model_type, "num_experts_per_tok": 6}).to_dict()
        for name, value in reference.to_dict().items():
            if name in ours and name not in ("architectures", "num_key_value_heads", "num_experts_per_tok"):
                assert ours[name] == value, (reference.model_type, name, ours[name], value)


def test_legacy_rope_scaling_and_rope_parameters_mean_the_same():
    legacy = {"model_type": "deepseek_v3", "rope_theta": 50000.0, "rope_scaling": {"type": "yarn", "factor": 8.0}}
    newer = {
        "model_type": "deepseek_v3",
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0},
    }
    a, b = ModelConfig.from_dict(legacy), ModelConfig.from_dict(newer)
    assert (
        (a.rope_theta, a.rope_scaling)
        == (b.rope_theta, b.rope_scaling)
        == (50000.0, {"rope_type": "yarn", "factor": 8.0})
    )


def test_to_dict_round_trips():
    config = preset("deepseek-v2-lite")
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config


def test_yarn_softmax_scale_uses_mscale_all_dim():
    config = preset("deepseek-v3")  # factor 40, mscale_all_dim 1.0
    mscale = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model_type": "llama"}, "model_type='llama'"),
        ({"hidden_size": 64}, "missing required field 'model_type'"),
        ({"model_type": "deepseek_v2"}, "num_experts_per_tok"),
        ({"model_type": "deepseek_v3", "n_group": 3}, "'n_group'"),
        ({"model_type": "deepseek_v3", "topk_group": 9}, "'topk_group'"),
        ({"model_type": "deepseek_v3", "hidden_size": "big"}, "'hidden_size'"),
        ({"model_type": "deepseek_v3", "kv_lora_rank": 0}, "'kv_lora_rank'"),
        ({"model_type": "deepseek_v3", "qk_rope_head_dim": 63}, "'qk_rope_head_dim'"),
        ({"model_type": "deepseek_v3", "scoring_func": "relu"}, "'scoring_func'"),
        ({"model_type": "deepseek_v3", "rope_scaling": {"type": "longrope"}}, "longrope"),
        ({"model_type": "deepseek_v3", "num_experts_per_tok": 300}, "'num_experts_per_tok' has value 300"),
    ],
)
def test_impossible_configs_are_rejected_by_name(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw, source="cfg.json")


@pytest.mark.parametrize(
    "change, refusal",
    [
        (dict(num_experts_per_tok=0), "field 'num_experts_per_tok' has value 0: input should be greater than 0"),
        (dict(num_experts_per_tok=-1), "field 'num_experts_per_tok' has value -1: input should be greater than 0"),
        (dict(num_experts_per_tok=9),
         "field 'num_experts_per_tok' has value 9: must be between 1 and n_routed_experts=8"),
        (dict(num_experts_per_tok=None), "num_experts_per_tok is required when n_routed_experts is set"),
        (dict(n_group=3), "field 'n_group' has value 3: must be a divisor of n_routed_experts=8"),
        (dict(topk_group=3), "field 'topk_group' has value 3: must be between 1 and n_group=2"),
        (dict(n_group=8, topk_group=2), "field 'n_group' has value 8: must be small enough that each group has >= 2"),
    ],
)  # fmt: skip
def test_a_config_built_in_python_with_impossible_routing_is_refused_at_once_naming_the_field_and_value(
    change, refusal
):
    """The router read num_experts_per_tok=0 or a topk_group past n_group from a ModelConfig built in Python, which
    checked nothing until a model was built on it."""
    tiny = preset("tiny")
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        dataclasses.replace(tiny, **change)
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        ModelConfig(**{**{f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)}, **change})


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=str(path)):
        ModelConfig.from_json(path)
    path.write_text(json.dumps({"model_type": "deepseek_v3", "n_group": 3}))
    with pytest.raises(ConfigError, match=rf"{path}: field 'n_group'"):
        ModelConfig.from_json(path)


def test_a_config_error_carries_its_field_and_file_apart_from_its_message():
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_dict({"model_type": "deepseek_v3", "rope_scaling": {"type": "yarn", "factor": 0.5}}, "c.json")
    assert (caught.value.field, caught.value.source) == ("rope_scaling.factor", "c.json")
    assert str(caught.value) == "c.json: field 'rope_scaling.factor' must be >= 1"


def test_a_config_file_setting_a_model_field_as_the_command_line_spells_it_is_told_where_the_file_nests_it(tmp_path):
    """`seekstack train cfg.yaml`'s help says "model.FIELD=VALUE sets a ModelConfig field": a file's key
    `model.hidden_size: 64` was refused as an unknown field, and `model: {hidden_size: 64}` as "input should be a
    valid string", neither saying that a file sets them under model_overrides."""
    from seekstack.schema import load_config
    from seekstack.train.config import TrainConfig

    path = tmp_path / "cfg.yaml"
    path.write_text("model.hidden_size: 64\n")
    with pytest.raises(ConfigError) as refused:
        load_config(TrainConfig, path)
    assert str(refused.value) == (
        f"{path}: unknown field 'model.hidden_size'; a file nests it, as model_overrides: {{hidden_size: VALUE}} "
        "(model.hidden_size=VALUE is its spelling on the command line)"
    )
    path.write_text("model:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="string; ModelConfig's fields go under model_overrides: {hidden_size: 64}$"):
        load_config(TrainConfig, path)
    path.write_text("model_overrides:\n  hidden_size: 64\n")
    assert load_config(TrainConfig, path).model_overrides == {"hidden_size": 64}


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_url_given_to_a_path_field_is_refused_naming_the_field_in_a_file_and_on_the_command_line(tmp_path, command):
    """`seekstack train data_dir=s3://bucket/tokens` was told "no folder of token shards at CWD/s3:/bucket/tokens"
    (the first override read as the config file's Path, its '//' collapsed), and a file's `data: hf://datasets/a/b`
    was joined to the file's folder: "CFG_DIR/hf:/datasets/a/b: no such file"."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    url = "s3://bucket/tokens"
    said = f"field 'data_dir': {url}: a URL, and seekstack takes local files and folders (nothing is downloaded"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data_dir: {url}\n")
    out = f"out_dir={tmp_path / 'run'}"
    for args in ([f"data_dir={url}", out], [str(path), out]):
        result = CliRunner().invoke(app, [command, *args])
        assert result.exit_code == 1 and said in " ".join(result.output.split()), result.output
    assert f"error: {path}: field 'data_dir'" in result.output and not (tmp_path / "run").exists()


def test_a_refused_value_is_echoed_as_its_start_and_size_not_whole():
    """A ConfigError echoed the whole value it refused: 301 bad_words (300 are taken) made a message of 2,389
    characters, a 3000-character temperature one of 3,064. It now shows the repr's first 80 characters and the size,
    a short value whole."""
    refused = {}
    for name, value in ("bad_words", tuple(f"w{i}" for i in range(301))), ("temperature", "x" * 3000), ("seed", "7"):
        with pytest.raises(ConfigError) as caught:
            SamplingParams(**{name: value}).validate()
        refused[name] = str(caught.value)
    assert refused == {
        "bad_words": "field 'bad_words' has value ('w0', 'w1', 'w2', 'w3', 'w4', 'w5', 'w6', 'w7', 'w8', 'w9', 'w10', "
        "'w11', 'w12'... (301 items): tuple should have at most 300 items after validation, not 301",
        "temperature": f"field 'temperature' has value '{'x' * 79}... (3,000 characters): input should be a valid "
        "number",
        "seed": "field 'seed' has value '7': input should be a valid integer",
    }


def test_a_value_no_config_holds_is_refused_naming_its_field():
    """SamplingParams(stop={"END"}) (a set, which JSON cannot hold) raised a bare TypeError "{'END'} (set) is not a
    configuration value", naming no field; so did any config given such a value in Python."""
    with pytest.raises(ConfigError) as caught:
        SamplingParams(stop={"END"})
    assert str(caught.value) == (
        "field 'stop' has value {'END'}: a set ({'END'}) is no configuration value: give a list, a mapping, text or a "
        "number"
    )
    with pytest.raises(ConfigError, match=r"^field 'logit_bias' has value \{1: \{5\}\}: a set \(\{5\}\) is no "):
        SamplingParams.from_dict({"logit_bias": {1: {5}}})
    with pytest.raises(ConfigError, match=r"^field 'logit_bias' has value \{\(1, 2\): 3\}: keys must be str"):
        SamplingParams.from_dict({"logit_bias": {(1, 2): 3}})


def test_numpy_numbers_are_taken_as_the_numbers_they_are():
    """SamplingParams(temperature=np.float32(0.5)) (a value from an array) was refused as "a float32 (np.float32(0.5))
    is no configuration value: give ... a number", and max_tokens=np.int64(5) as "must be an int"."""
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), seed=np.int32(3)).validate()
    assert (params.temperature, params.top_k, params.seed) == (0.5, 5, 3) and type(params.top_k) is int
    assert SamplingParams(max_tokens=np.int64(5)).validate().max_new_tokens == 5


def test_numpy_arrays_and_tensors_are_taken_as_the_lists_they_hold():
    """SamplingParams(stop_token_ids=np.array([5, 6])), which vLLM's takes (any sequence of ints), was refused as "a
    ndarray (array([5, 6])) is no configuration value"; a tensor alike."""
    params = SamplingParams(stop_token_ids=np.array([5, 6]), allowed_token_ids=torch.tensor([7])).validate()
    assert (params.stop_token_ids, params.allowed_token_ids) == ((5, 6), (7,)) and type(params.stop_token_ids[0]) is int
    with pytest.raises(ConfigError, match=r"^field 'stop_token_ids.0' has value np.float64\(5.5\): input should be a "):
        SamplingParams(stop_token_ids=np.array([5.5]))


def test_a_config_file_not_in_utf8_is_refused_naming_it_and_one_opening_with_a_byte_order_mark_is_read(tmp_path):
    """A YAML saved as GBK (Chinese comments, a Windows editor) raised a bare "'utf-8' codec can't decode byte 0xc4 in
    position 2" naming no file (seekstack train run.yaml); a JSON Notepad saved with a BOM "cannot be parsed". A
    YAML in UTF-16, its mark opening it, is read as PyYAML reads it; one cut short is told so, not to convert from GBK
    (as it was told: "not UTF-8 text (truncated data at byte 74): save it as UTF-8 (iconv -f GBK ...")."""
    gbk = tmp_path / "run.yaml"
    gbk.write_bytes("# 你好\npreset: tiny\n".encode("gbk"))
    told = rf"^{re.escape(str(gbk))}: not UTF-8 text \(invalid continuation byte at byte 2\): save it as UTF-8 \(iconv"
    with pytest.raises(ConfigError, match=told):
        read_config_file(gbk)
    marked = tmp_path / "run.json"
    marked.write_bytes(codecs.BOM_UTF8 + json.dumps({"preset": "tiny"}).encode())
    assert read_config_file(marked) == {"preset": "tiny"}
    wide = tmp_path / "wide.yaml"  # Windows PowerShell 5's `"preset: tiny" > wide.yaml`: told to iconv -f LATIN1
    wide.write_bytes("# 你好\npreset: tiny\n".encode("utf-16"))
    assert read_config_file(wide) == {"preset": "tiny"}
    cut = tmp_path / "cut.json"
    cut.write_bytes(json.dumps({"preset": "tiny"}).encode("utf-16")[:-1])
    told = rf"^{re.escape(str(cut))}: UTF-16 text \(its byte order mark says so\) that does not decode \("
    with pytest.raises(ConfigError, match=told + r"truncated data at byte 36\): the file is truncated or damaged; "):
        read_config_file(cut)


def test_a_yaml_file_written_in_toml_is_refused_saying_it_is_read_as_yaml_and_how_to_write_its_line(tmp_path):
    """cfg.yaml holding TOML's `lr = 3e-4` (a plain YAML text) was told "expected a mapping of field names to values",
    and one mixing it into YAML's lines a bare parse error, neither saying the file is read as YAML."""
    toml_only, mixed = tmp_path / "cfg.yaml", tmp_path / "mixed.yml"
    toml_only.write_bytes(b"lr = 3e-4\r\nmax_steps = 2\r\n")  # Windows' line ends
    mixed.write_text("max_steps: 2\nlr = 3e-4 \n")
    told = "it is read as YAML (its suffix), where line {}, 'lr = 3e-4', TOML's key = value, is text, no field: "
    told += "write it lr: 3e-4, or name the file .toml to have it read as TOML"
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(toml_only))}: expected a mapping .*: {re.escape(told.format(1))}$"
    ):
        read_config_file(toml_only)
    with pytest.raises(
        ConfigError, match=rf"(?s)^{re.escape(str(mixed))}: cannot be parsed .*: {re.escape(told.format(2))}$"
    ):
        read_config_file(mixed)
    (tmp_path / "cfg.toml").write_text(toml_only.read_text())
    assert read_config_file(tmp_path / "cfg.toml") == {"lr": 3e-4, "max_steps": 2}
    block = tmp_path / "block.yaml"  # an indented `answer = 42` is a block text's: the error is elsewhere
    block.write_text("system: |\n  answer = 42\nmax_steps: 2\n lr: 3e-4\n")
    with pytest.raises(ConfigError) as elsewhere:
        read_config_file(block)
    assert "line 4, column 4" in str(elsewhere.value) and "TOML" not in str(elsewhere.value)


def test_a_shown_value_of_one_item_counts_it_singular():
    """shown_value of a long list of one item said '(1 items)'."""
    assert shown_value(["x" * 100]) == f"['{'x' * 78}... (1 item)"
    assert shown_value(list(range(1200))).endswith("... (1,200 items)")


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_a_preset_override_that_is_no_field_is_refused_naming_the_closest_field():
    typo = "ModelConfig has no field 'num_hidden_layer'; did you mean 'num_hidden_layers'"
    with pytest.raises(ConfigError, match=typo):
        preset("tiny", num_hidden_layer=2)
    assert preset("tiny", num_hidden_layers=2).num_hidden_layers == 2


def test_help_shows_each_field_type_without_constraint_markers():
    from seekstack.posttrain.config import SFTConfig
    from seekstack.schema import describe_fields

    described = describe_fields(SFTConfig)
    assert "betas = [0.9, 0.95]  (tuple[float, float])" in described and 'threads = "auto"  (int | auto)' in described
    assert "typing" not in described and "Interval" not in described


def test_a_yarn_config_without_a_factor_is_refused_naming_the_field_as_transformers_refuses_it():
    config = {"model_type": "deepseek_v3", "max_position_embeddings": 16384,
              "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor.*given under yarn"):
        ModelConfig.from_dict(config, "c.json")


@pytest.mark.parametrize(
    "scaling, refusal",
    [
        ({"type": "linear"}, r"c\.json: field 'rope_scaling\.factor' must be given under linear"),
        ({"type": "linear", "factor": 0.5}, r"c\.json: field 'rope_scaling\.factor' must be >= 1"),
        ({"type": "dynamic", "factor": 4.0}, r"c\.json: rope_scaling\.rope_type='dynamic' is not supported; expected "
         r"one of \('default', 'linear', 'yarn'\)"),
        ({"type": "llama3", "factor": 8.0}, r"rope_type='llama3' is not supported"),
    ],
)  # fmt: skip
def test_rope_scalings_are_refused_naming_the_file_the_field_or_the_type_we_do_not_compute(scaling, refusal):
    with pytest.raises(ConfigError, match=refusal):
        ModelConfig.from_dict({"model_type": "deepseek_v3", "rope_scaling": scaling}, "c.json")


ORIGINAL = "original_max_position_embeddings"
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"rope_parameters": {**YARN, "factor": "4"}}, "rope_scaling.factor"),
        ({"rope_parameters": {**YARN, "factor": [4]}}, "rope_scaling.factor"),
        ({"rope_parameters": {**YARN, "mscale_all_dim": "1.0"}}, "rope_scaling.mscale_all_dim"),
        ({"rope_scaling": {**YARN, "original_max_position_embeddings": "4096"}}, f"rope_scaling.{ORIGINAL}"),
        ({"rope_scaling": {**YARN, "original_max_position_embeddings": 0}}, f"rope_scaling.{ORIGINAL}"),
        ({"rope_parameters": {**YARN, "beta_fast": "32"}}, "rope_scaling.beta_fast"),
        ({"rope_parameters": {**YARN, "beta_slow": -1}}, "rope_scaling.beta_slow"),
        ({"rope_parameters": {**YARN, "attention_factor": True}}, "rope_scaling.attention_factor"),
        ({"rope_parameters": {**YARN, "truncate": "no"}}, "rope_scaling.truncate"),
        ({"rope_parameters": {**YARN, "rope_theta": "abc"}}, "rope_parameters.rope_theta"),
        ({"rope_theta": None}, "rope_theta"),
    ],
)  # fmt: skip
def test_a_rope_field_that_holds_no_usable_number_is_refused_naming_the_file_and_the_field(raw, field):
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_dict({"model_type": "deepseek_v3", **raw}, "c.json")
    assert (caught.value.field, caught.value.source) == (field, "c.json")
    assert str(caught.value).startswith(f"c.json: field {field!r} ")


def test_null_yarn_fields_that_have_a_default_take_it():
    from seekstack.model.rope import yarn_inverse_frequencies

    nulls, defaults = (
        ModelConfig.from_dict({"model_type": "deepseek_v3", "rope_parameters": {**YARN, "beta_fast": beta}}, "c.json")
        for beta in (None, 32)
    )
    assert yarn_inverse_frequencies(nulls)[0].equal(yarn_inverse_frequencies(defaults)[0])


@pytest.mark.parametrize(
    ("model_type", "alias", "field"),
    [
        ("deepseek_v3", "num_local_experts", "n_routed_experts"),
        ("deepseek_v2", "num_experts", "n_routed_experts"),
        ("deepseek_v3", "num_mtp_layers", "num_nextn_predict_layers"),
    ],
)
def test_transformers_other_name_of_a_field_is_read_as_that_field_and_refused_beside_another_value(
    model_type, alias, field
):
    raw = {"model_type": model_type, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, alias: 4}
    config = ModelConfig.from_dict(raw)
    reference = transformers.AutoConfig.for_model(**raw)
    assert getattr(config, field) == getattr(reference, field) == 4
    assert alias not in config.to_dict() and config.to_dict()[field] == 4
    with pytest.raises(ConfigError) as refused:
        ModelConfig.from_dict({**raw, field: 6}, source="m/config.json")
    assert str(refused.value) == (
        f"m/config.json: {alias}=4 beside {field}=6: {alias} is transformers' name for {field} in a {model_type} "
        "config, and they differ: give one of them"
    )
    assert getattr(ModelConfig.from_dict({**raw, field: 4}), field) == 4
    # null is unset, not a second value: beside the field, in either order, the one given is read
    assert getattr(ModelConfig.from_dict({**raw, alias: None, field: 6}), field) == 6
    assert getattr(ModelConfig.from_dict({field: 6, **raw, alias: None}), field) == 6
    assert getattr(ModelConfig.from_dict({**raw, field: None}), field) == 4
    assert getattr(ModelConfig.from_dict({field: None, **raw}), field) == 4
    absent = {key: value for key, value in raw.items() if key != alias}
    assert getattr(ModelConfig.from_dict({**absent, alias: None}), field) == getattr(
        ModelConfig.from_dict(absent), field
    )


def test_a_config_is_checked_once_where_it_is_built_not_again_by_replace_or_the_model(monkeypatch):
    """replace built a copy (checked) and then checked it again (recheck builds a third), and Transformer checked
    its config once more: the rules across fields ran three times on the path preset -> replace -> model."""
    from seekstack.model.transformer import Transformer

    tiny = preset("tiny")
    checks = []
    rules = ModelConfig._check_rules
    monkeypatch.setattr(ModelConfig, "_check_rules", lambda config: checks.append(config) or rules(config))
    shallow = tiny.replace(num_hidden_layers=2)
    assert len(checks) == 1 and checks[0] is shallow
    Transformer(shallow)
    assert len(checks) == 1
    with pytest.raises(ConfigError, match="unknown field 'hiden_size'"):
        tiny.replace(hiden_size=64)


@pytest.mark.parametrize("field", ["n_group", "topk_group"])
def test_a_null_routing_group_field_is_refused_by_name_where_routing_uses_groups(field):
    """A config.json's `"n_group": null` was read as 1 group, routing over all experts where the checkpoint's router
    was trained on groups; transformers keeps the null and its router fails on it (int // None). Greedy routing reads
    neither field, so a DeepSeek-V2-Lite config's nulls stay valid."""
    with pytest.raises(ConfigError, match=rf"config.json: field '{field}' has value None: must be a positive integer "):
        ModelConfig.from_dict({"model_type": "deepseek_v3", field: None}, source="config.json")
    lite = ModelConfig.from_dict(
        {"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_method": "greedy", field: None}
    )
    assert lite.routing_groups == (1, 1)
