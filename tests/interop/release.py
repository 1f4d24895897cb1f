"""A DeepSeek release as a user downloads it, shrunk: transformers' model with random weights, and beside it the
files as the release writes them (config.json's keys and quirks, generation_config.json, a tokenizer.json whose
post-processor puts BOS first, tokenizer_config.json with a chat template)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from seekstack.tokenizer import BOS, EOS, train_tokenizer
from tests.test_hf_parity import randomise
from tests.test_tokenizer import stdlib_texts

VOCAB = 512  # config.json's vocab_size, past the tokenizer's ids as DeepSeek-V3's 129,280 is
DIMS = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, max_position_embeddings=163840,
)  # fmt: skip
YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096}  # fmt: skip
# DeepSeek-V3's config.json keys that transformers' config does not hold, as released
RELEASE_KEYS = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001, "ep_size": 1, "moe_layer_freq": 1, "pretraining_tp": 1, "seq_aux": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
}  # fmt: skip


def release_tokenizer(folder: Path) -> None:
    """A byte-level BPE whose tokenizer.json puts BOS before a text, as DeepSeek-V3's post-processor does, and a
    tokenizer_config.json as the release's (LlamaTokenizerFast, add_bos_token)."""
    tokenizer = train_tokenizer(stdlib_texts(100_000), vocab_size=400, out_path=folder)
    tokenizer.backend.post_processor = bos_first(tokenizer.bos_id)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, pad_token=EOS, model_max_length=16384)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def release_tokenizer_with_template(folder: Path, chat_template: str) -> None:
    """`release_tokenizer` with another release's tokenizer_config.json `chat_template`."""
    release_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def r1_tokenizer(folder: Path) -> None:
    """`release_tokenizer` with DeepSeek-R1's tokenizer_config.json chat template (R1_CHAT_TEMPLATE), as released."""
    release_tokenizer_with_template(folder, R1_CHAT_TEMPLATE)


# DeepSeek-R1's chat template (since its January 2025 update), as its tokenizer_config.json holds it: the generation
# prompt opens the reply's reasoning, <｜Assistant｜><think>\n
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}"
    "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' +"
    " tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' +"
    " '```' + '<｜tool▁call▁end｜>'}}{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] +"
    " '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' +"
    " tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' +"
    " '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# DeepSeek-V2-Chat's (and V2-Lite-Chat's, Coder-V2-Instruct's) chat template, as its tokenizer_config.json holds it
V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
V2_LITE_KEYS = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001, "moe_layer_freq": 1, "pretraining_tp": 1, "seq_aux": True, "q_lora_rank": None,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
}  # fmt: skip


def v2_chat_tokenizer(folder: Path) -> None:
    """A byte-level BPE with DeepSeek-V2's special tokens (BOS, EOS and fill-in-the-middle ones, no role tokens),
    BOS put first by its post-processor, and tokenizer_config.json with V2_CHAT_TEMPLATE, as the V2 chat releases."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(stdlib_texts(100_000), trainer=trainer)
    backend.add_special_tokens([AddedToken("<｜fim▁hole｜>", special=True, normalized=False)])
    backend.post_processor = bos_first(backend.token_to_id(BOS))
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "model_max_length": 16384,
              "chat_template": V2_CHAT_TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def deepseek_v2_lite_chat_release(folder: Path) -> Path:
    """`folder` holding a shrunk DeepSeek-V2-Lite-Chat release in bfloat16: its config.json keys (q_lora_rank null,
    greedy softmax routing, yarn with mscale 0.707), its tokenizer with its own chat template."""
    torch.manual_seed(0)
    yarn = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    transformers_keys = {key: value for key, value in V2_LITE_KEYS.items() if key in DeepseekV2Config().to_dict()}
    config = DeepseekV2Config(
        **DIMS | transformers_keys, vocab_size=VOCAB, rope_parameters={"rope_type": "yarn", **yarn}
    )
    return _saved_release(folder, DeepseekV2ForCausalLM(config), v2_chat_tokenizer, V2_LITE_KEYS, yarn)


def bos_first(bos_id: int) -> processors.PostProcessor:
    """DeepSeek's tokenizer.json post-processor: byte-level offsets, and BOS before each text."""
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )


def deepseek_v3_release(folder: Path, generation_config: dict | None = None) -> Path:
    """`folder` holding a shrunk DeepSeek-V3 release in bfloat16: transformers' save, then config.json rewritten with
    the release's keys (legacy rope_scaling, auto_map, torch_dtype ...), and `generation_config` if given."""
    torch.manual_seed(0)
    config = DeepseekV3Config(**DIMS, vocab_size=VOCAB, rope_parameters={"rope_type": "yarn", **YARN})
    _saved_release(folder, DeepseekV3ForCausalLM(config), release_tokenizer, RELEASE_KEYS, YARN)
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return folder


def _saved_release(
    folder: Path, model: torch.nn.Module, write_tokenizer: Callable[[Path], object], keys: dict, yarn: dict
) -> Path:
    """`model` randomised and saved into `folder` in bfloat16 by transformers, `write_tokenizer`'s tokenizer beside it,
    and config.json rewritten as the release writes it: DIMS, its `keys`, legacy rope_theta + rope_scaling (`yarn`);
    no generation_config.json."""
    randomise(model.eval(), seed=0)
    model.to(torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder)
    model_type = "deepseek_v2" if isinstance(model, DeepseekV2ForCausalLM) else "deepseek_v3"
    released = {**DIMS, **keys, "model_type": model_type, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1,
                "rope_theta": 10000, "rope_scaling": {**yarn, "type": "yarn"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(released, indent=2), encoding="utf-8")
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder


def v3_0324_tokenizer(folder: Path) -> None:
    """`release_tokenizer` with DeepSeek-V3-0324's tokenizer_config.json chat template (V3_0324_CHAT_TEMPLATE)."""
    release_tokenizer_with_template(folder, V3_0324_CHAT_TEMPLATE)


# DeepSeek-V3-0324's chat template, as its tokenizer_config.json holds it: the first V3 release's tool turns mended
# (every call block closed, <｜tool▁outputs▁end｜> before a later round of calls)
V3_0324_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true, is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}"
    "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}"
    "{%- set ns.is_last_user = true -%}{{'<｜User｜>' + message['content'] + '<｜Assistant｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and "
    "message['tool_calls'] is not none %}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] +"
    " '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] +"
    " '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] +"
    " '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' +"
    " '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or "
    "message['tool_calls'] is none)%}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
