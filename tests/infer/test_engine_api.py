"""The Engine's request interface as vLLM's engine offers it (add_request, step, abort), beyond test_engine.py."""

from __future__ import annotations

import pytest

from seekstack.checkpoint import CheckpointError
from seekstack.infer import Engine, LoRARequest, SamplingParams
from seekstack.infer.engine import COMPILE_AFTER_SECONDS
from seekstack.infer.params import EngineOptions


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro checkpoint folder, written once for the module's tests, which only read it."""
    from tests.infer.support import model_dir

    return model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def adapter_folders(base, tmp_path_factory):
    """Two random adapters on `base` (seeds 1 and 2), by seed, written once for the module's tests."""
    from tests.adapters.support import write_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {seed: write_random_adapter(base, root / f"seed-{seed}", seed=seed) for seed in (1, 2)}


def test_an_engine_loaded_with_an_adapter_merged_names_the_base_and_the_adapter(base, adapter_folders):
    """`generate --json --adapter DIR` printed the base's folder name as the model, though its weights were the base's
    with the adapter merged in; the name now says both (the base alone keeps its folder's name)."""
    assert Engine.from_pretrained(base).model_name == base.name
    assert Engine.from_pretrained(base, adapter=adapter_folders[1]).model_name == f"{base.name}+seed-1"


def test_abort_of_a_list_of_ids_drops_each_as_vllms_abort_request_takes_them(model, tokenizer):
    """vLLM's abort_request takes one id or several; a list here was compared with each request's id as a whole, so
    engine.abort(["a", "b"]) matched none, dropped nothing and returned None (the answer for an unknown id)."""
    engine = Engine(model, tokenizer, max_batch_size=1)
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    started, queued, kept = (engine.add_request([5, 9, 14], long) for _ in range(3))
    engine.step()  # admits `started` only: the batch holds one
    assert engine.abort([queued, started, "no-such-id"]) == [False, True, None]
    assert engine.abort(request for request in [queued]) == [None]  # gone already; any iterable of ids
    finished = {output.request_id: output.finish_reason for output in engine.step() if output.finished}
    assert finished == {queued: "abort", started: "abort"}
    assert [request.request_id for request in [*engine.waiting, *engine.prefilling, *engine.running]] == [kept]
    assert engine.abort_request([kept]) == [True]  # vLLM's name (AttributeError before): abort itself
    assert [output.finish_reason for output in engine.step()] == ["abort"] and not engine.has_unfinished_requests()
    assert Engine.abort_request is Engine.abort


def test_a_request_id_that_is_no_str_is_refused_at_add_request_and_at_abort(model, tokenizer):
    """add_request(ids, params, request_id=7) was taken, and abort(7) then raised a bare "TypeError: 'int' object is
    not iterable" (an id that is no str reads as a list of ids); the outputs carried 7, where vLLM's ids are str."""
    engine = Engine(model, tokenizer)
    with pytest.raises(TypeError, match=r"^request_id must be a str, as vLLM's, got int 7: give '7'$"):
        engine.add_request([5, 9, 14], SamplingParams(max_new_tokens=2), request_id=7)
    assert not engine.has_unfinished()
    assert engine.add_request([5, 9, 14], SamplingParams(max_new_tokens=2), request_id="7") == "7"
    for request_id in (7, [7]):
        with pytest.raises(TypeError, match=r"^request_id must be a str or a list of them, .* got int 7$"):
            engine.abort(request_id)
    assert engine.abort("7") is False


def test_one_adapter_name_runs_every_prompt_on_that_adapter_not_one_letter_each(base, adapter_folders):
    """adapters="ab" (one name, as vLLM's generate takes one lora_request for all prompts) was read as a sequence of
    names, one letter a prompt: two prompts ran on adapters 'a' and 'b' ("no adapter 'a'"), three were refused as
    "3 prompts but 2 adapters". One name now runs every prompt on that adapter, as a list naming it for each does."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22)
    engine.load_adapter("ab", adapter_folders[1])
    greedy, prompts = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True), [[5, 9], [14, 3], [7]]
    each = [output.token_ids for output in engine.generate(prompts, greedy, adapters=["ab"] * 3)]
    assert [output.token_ids for output in engine.generate(prompts, greedy, adapters="ab")] == each
    assert [output.token_ids for output in engine.generate(prompts[:2], greedy, adapters="ab")] == each[:2]
    assert each != [output.token_ids for output in engine.generate(prompts, greedy)]  # the adapter changes them


def test_vllms_lora_request_runs_prompts_on_the_adapter_it_names_loading_it_on_first_use(
    base, adapter_folders, monkeypatch
):
    """vLLM's generate(prompts, params, lora_request=LoRARequest(name, id, path)) and chat(messages, params, use_tqdm,
    lora_request) raised "TypeError: ... got an unexpected keyword argument 'lora_request'" (chat took no adapter at
    all). The request's adapter is loaded as its lora_name on first use, as vLLM's, and runs the prompts given it."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22)
    folder, other = adapter_folders[1], adapter_folders[2]
    greedy, prompts, request = (
        SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
        [[5, 9], [14]],
        LoRARequest("legal", 1, folder),
    )

    def tokens(**adapter):
        return [output.token_ids for output in engine.generate(prompts, greedy, **adapter)]

    adapted = tokens(lora_request=request)
    assert engine.lora.folders == {"legal": folder}  # loaded on first use
    assert adapted == tokens(adapters="legal") != tokens()
    assert tokens(lora_request=[None, request]) == [tokens()[0], adapted[1]]  # one per prompt
    assert tokens(lora_request=LoRARequest("legal")) == adapted  # a loaded name needs no path
    messages = [{"role": "user", "content": "hi"}]
    [chatted] = engine.chat(messages, greedy, False, request)  # vLLM's order: lora_request fourth
    [plain] = engine.chat(messages, greedy)
    assert chatted.token_ids != plain.token_ids
    assert chatted.token_ids == engine.generate([chatted.prompt_token_ids], greedy, adapters="legal")[0].token_ids
    for given, error, told in (
        ({"lora_request": LoRARequest("legal", 2, other)}, ValueError, f"lora_request names adapter 'legal' at "
         f"{other}, but 'legal' is loaded from {folder}: unload_adapter('legal') first, or give this one another "
         "lora_name"),
        ({"lora_request": request, "adapters": "legal"}, ValueError, "adapters= beside lora_request=: lora_request is "
         "vLLM's way to name them; give one"),
        ({"lora_request": "legal"}, TypeError, "lora_request='legal': give a LoRARequest(lora_name, lora_int_id, "
         "lora_path) (seekstack.infer's or vLLM's) for all prompts or one per prompt; a loaded adapter's name goes in "
         "adapters="),
        ({"lora_request": [request]}, ValueError, "2 prompts but 1 lora_request: give one per prompt (None: the base "
         "model), one for all, or leave lora_request out"),
        ({"lora_request": LoRARequest("typo", 3, "~no-such-user-here/legal")}, ValueError, "~no-such-user-here/legal "
         "does not exist; give an adapter folder (adapter_config.json and adapter_model.safetensors)"),  # RuntimeError
    ):  # fmt: skip
        with pytest.raises(error) as refused:
            engine.generate(prompts, greedy, **given)
        assert str(refused.value) == told
    assert engine.lora.folders == {"legal": folder}
    monkeypatch.setenv("HOME", str(folder.parent))  # a lora_path under the user's home, as vLLM expands it
    assert tokens(lora_request=LoRARequest("home", 2, f"~/{folder.name}")) == adapted
    assert engine.lora.folders == {"legal": folder, "home": folder}
    engine.load_adapter("loaded", f"~/{folder.name}")  # load_adapter reads it as lora_request and the HTTP route do
    assert engine.lora.folders["loaded"] == folder and tokens(adapters="loaded") == adapted
    merged = Engine.from_pretrained(base, adapter=f"~/{folder.name}", kv_cache_memory=1 << 22)  # merged alike
    assert [output.token_ids for output in merged.generate(prompts, greedy)] == adapted


def test_a_lora_request_refused_names_a_long_adapter_name_by_its_start(base, adapter_folders):
    """A lora_request of a 5,000-character lora_name, or a text of that length for a LoRARequest, was echoed whole
    (three times in the message of a name loaded from another folder), as the adapter registry's messages cut it."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22)
    long, shown = "l" * 5000, f"'{'l' * 79}... (5,000 characters)"
    engine.load_adapter(long, adapter_folders[1])
    for given, told in (
        (LoRARequest(long, 2, adapter_folders[2]), f"lora_request names adapter {shown} at {adapter_folders[2]}, but "
         f"{shown} is loaded from {adapter_folders[1]}: unload_adapter({shown}) first, or give this one another "
         "lora_name"),
        (long, f"lora_request={shown}: give a LoRARequest(lora_name, lora_int_id, lora_path)"),
    ):  # fmt: skip
        with pytest.raises((TypeError, ValueError)) as refused:
            engine.generate([[5]], SamplingParams(max_new_tokens=1), lora_request=given)
        assert str(refused.value).startswith(told)


def test_lora_requests_past_max_loras_unload_the_least_recent_one_they_loaded_as_vllms_lru(base, adapter_folders):
    """With every slot taken, a LoRARequest for another adapter was refused ("all max_loras=1 adapter slots are
    taken"), where vLLM evicts the least recently used adapter, so a script cycling through more adapters than
    max_loras ran there and stopped here. The least recently asked for adapter that lora_request loaded, unused, now
    gives up its slot; one load_adapter loaded, or one another prompt of the same call runs on, does not."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=1)
    folders = {"a": adapter_folders[1], "b": adapter_folders[2]}
    asked = {name: LoRARequest(name, seed + 1, folder) for seed, (name, folder) in enumerate(folders.items())}
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)

    def tokens(name):
        return engine.generate([[5, 9]], greedy, lora_request=asked[name])[0].token_ids

    first = tokens("a")
    assert tokens("b") != first and engine.lora.folders == {"b": folders["b"]}  # "a" gave up its slot
    assert tokens("a") == first and engine.lora.folders == {"a": folders["a"]}
    full = r"^field 'max_loras': all 1 adapter slots are taken, so adapter 'b' cannot load \(loaded: a\)"
    with pytest.raises(ValueError, match=full):  # "a" is kept for the call's other prompt
        engine.generate([[5], [9]], greedy, lora_request=[asked["a"], asked["b"]])
    engine.unload_adapter("a")
    engine.load_adapter("mine", folders["a"])  # the user's: never unloaded for a lora_request
    with pytest.raises(ValueError, match=full.replace("loaded: a", "loaded: mine")):
        tokens("b")
    assert engine.lora.folders == {"mine": folders["a"]}


def test_an_adapter_load_adapter_loads_again_after_a_lora_request_loaded_it_is_never_unloaded_for_another(
    base, adapter_folders
):
    """A name stayed among those lora_request loaded after unload_adapter: request "a", unload_adapter("a"),
    load_adapter("a"), and a request for "b" (max_loras=1) unloaded the user's "a", which README says load_adapter's
    adapters never are. load_adapter and unload_adapter now drop the name from the lora_request-loaded ones."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=1)
    greedy = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    engine.generate([[5, 9]], greedy, lora_request=LoRARequest("a", 1, adapter_folders[1]))
    engine.unload_adapter("a")
    engine.load_adapter("a", adapter_folders[1])
    full = r"^field 'max_loras': all 1 adapter slots are taken, so adapter 'b' cannot load \(loaded: a\)"
    with pytest.raises(ValueError, match=full):
        engine.generate([[5, 9]], greedy, lora_request=LoRARequest("b", 2, adapter_folders[2]))
    assert engine.lora.folders == {"a": adapter_folders[1]}
    engine.unload_adapter("a")  # and one lora_request loads again is its own again: unloaded for another
    engine.generate([[5, 9]], greedy, lora_request=LoRARequest("a", 1, adapter_folders[1]))
    engine.generate([[5, 9]], greedy, lora_request=LoRARequest("b", 2, adapter_folders[2]))
    assert engine.lora.folders == {"b": adapter_folders[2]}


def test_a_lora_request_whose_folder_holds_no_adapter_unloads_none_for_it(base, adapter_folders, tmp_path):
    """The least recent adapter was unloaded before the new one's folder was read: a LoRARequest naming a missing
    folder raised CheckpointError and had already unloaded "a", which the next request had to load again. The folder
    is now read first, and an adapter unloaded only for one that loads: one the engine refuses once read (a name it
    does not take) gives the slot back."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=1)
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    [adapted] = engine.generate([[5, 9]], greedy, lora_request=LoRARequest("a", 1, adapter_folders[1]))
    for folder in (tmp_path / "missing", base):  # no folder; a folder with a model, not an adapter
        with pytest.raises(CheckpointError):
            engine.generate([[5, 9]], greedy, lora_request=LoRARequest("b", 2, folder))
        assert engine.lora.folders == {"a": adapter_folders[1]}
    with pytest.raises(ValueError, match=r"^adapter name 'b b': use letters, digits"):
        engine.generate([[5, 9]], greedy, lora_request=LoRARequest("b b", 2, adapter_folders[2]))
    assert engine.lora.folders == {"a": adapter_folders[1]}
    assert engine.generate([[5, 9]], greedy, adapters="a")[0].token_ids == adapted.token_ids


def test_an_adapter_a_later_prompt_of_the_call_runs_on_is_not_unloaded_for_an_earlier_ones(base, adapter_folders):
    """Only the adapters of the prompts already read were kept: lora_request=[b, a] with "a" loaded (max_loras=1)
    unloaded "a" for "b", then found no slot for "a" ("... (loaded: b)"), leaving "a" unloaded; with max_loras=2, "a"
    was unloaded and loaded again. Every adapter the call names is kept now."""
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=1)
    greedy = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    a, b = LoRARequest("a", 1, adapter_folders[1]), LoRARequest("b", 2, adapter_folders[2])
    engine.generate([[5, 9]], greedy, lora_request=a)
    full = r"^field 'max_loras': all 1 adapter slots are taken, so adapter 'b' cannot load \(loaded: a\)"
    with pytest.raises(ValueError, match=full):
        engine.generate([[5], [9]], greedy, lora_request=[b, a])
    assert engine.lora.folders == {"a": adapter_folders[1]}
    two = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=2)
    for request in (a, b):  # "a" the least recent
        two.generate([[5, 9]], greedy, lora_request=request)
    slot_of_a = two.lora.slots["a"]
    two.generate([[5], [9]], greedy, lora_request=[LoRARequest("c", 3, adapter_folders[2]), a])
    assert two.lora.folders == {"a": adapter_folders[1], "c": adapter_folders[2]}
    assert two.lora.slots["a"] == slot_of_a  # kept, not loaded again


def test_chat_drops_chat_template_kwargs_its_template_does_not_read_and_refuses_the_others(model, tokenizer):
    """vLLM's chat(messages, params, chat_template_kwargs={"enable_thinking": False}), which scripts send to every
    model, and chat_template= raised "TypeError: Engine.chat() got an unexpected keyword argument", where the server
    reads a request's chat_template_kwargs: keys the template does not read dropped, as vLLM drops them, those it reads
    (or apply_chat_template's options) refused, since the template is rendered as it is."""
    engine = Engine(model, tokenizer)
    greedy, messages = (
        SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
        [{"role": "user", "content": "hi"}],
    )
    [plain] = engine.chat(messages, greedy)
    [unread] = engine.chat(messages, greedy, chat_template_kwargs={"enable_thinking": False, "thinking": True})
    assert (unread.prompt_token_ids, unread.token_ids) == (plain.prompt_token_ids, plain.token_ids)
    assert engine.chat(messages, greedy, chat_template=None, chat_template_kwargs={})[0].token_ids == plain.token_ids
    for given, told in (
        ({"chat_template_kwargs": {"enable_thinking": False, "bos_token": "x"}}, "chat_template_kwargs 'bos_token': a "
         "name the chat template reads, which chat sets from its own keywords (add_generation_prompt, "
         "continue_final_message, tools) or leaves unset: leave it out (keys the template does not read are dropped, "
         "as vLLM drops them)"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs 'add_generation_prompt': a "
         "name the chat template reads, which chat sets from its own keywords (add_generation_prompt, "
         "continue_final_message, tools) or leaves unset: leave it out (keys the template does not read are dropped, "
         "as vLLM drops them)"),
        ({"chat_template": "{{ messages[0]['content'] }}"}, "chat_template= (vLLM's) is not taken: chat renders the "
         "tokenizer's own chat template as it is; render a conversation another way yourself and give its text or "
         "token ids to generate"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as refused:
            engine.chat(messages, greedy, **given)
        assert str(refused.value) == told
    assert engine.stats().waiting == 0 and not engine.running


def test_chat_and_the_server_judge_chat_template_kwargs_by_one_helper(model, tokenizer):
    """Engine.chat copied the server's check of chat_template_kwargs (the same names read, the same apply_chat_template
    options), so the two could drift apart; both now ask template_kwarg_read which key is refused, each in its words."""
    from seekstack.serve.errors import APIError
    from seekstack.serve.protocol import refuse_template_kwargs, template_kwarg_read

    engine, messages = Engine(model, tokenizer), [{"role": "user", "content": "hi"}]
    greedy = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    for given, key in (
        (None, None),
        ({}, None),
        ({"enable_thinking": False, "thinking": True}, None),
        ({"enable_thinking": False, "bos_token": "x", "tools": []}, "bos_token"),
        ({"documents": [], "messages": []}, "documents"),
    ):
        assert template_kwarg_read(given, tokenizer) == key
        if key is None:
            refuse_template_kwargs(given, tokenizer)
            assert len(engine.chat(messages, greedy, chat_template_kwargs=given)[0].token_ids) == 1
            continue
        with pytest.raises(APIError) as served:
            refuse_template_kwargs(given, tokenizer)
        with pytest.raises(ValueError) as chatted:
            engine.chat(messages, greedy, chat_template_kwargs=given)
        assert served.value.param == f"chat_template_kwargs.{key}"
        assert str(chatted.value).startswith(f"chat_template_kwargs {key!r}: a name the chat template reads")


def test_a_callable_use_tqdm_makes_the_bar_that_counts_the_finished_requests_as_vllms(model, tokenizer):
    """vLLM's use_tqdm may be a callable making the bar (functools.partial(tqdm, leave=False)); here it was read as
    True, so the caller's bar was never made and rich's default one drawn instead."""
    made = []

    class Bar:
        def __init__(self, **keywords):
            self.keywords, self.updates, self.closed = keywords, [], False
            made.append(self)

        def update(self, count):
            self.updates.append(count)

        def close(self):
            self.closed = True

    engine = Engine(model, tokenizer)
    engine.generate([[5, 9], [14]], SamplingParams(max_new_tokens=2, n=2), use_tqdm=Bar)
    [bar] = made
    assert (bar.keywords, bar.updates, bar.closed) == ({"total": 4, "desc": "Processed prompts"}, [1] * 4, True)


def test_a_third_argument_that_names_no_adapter_is_refused_saying_use_tqdm_is_a_keyword(model, tokenizer):
    """vLLM's generate(prompts, params, True) turns its bar on (use_tqdm, its third argument); here the third is
    adapters, and True raised "TypeError: 'bool' object is not iterable", naming neither."""
    engine = Engine(model, tokenizer)
    for given in (True, 3):
        with pytest.raises(TypeError) as refused:
            engine.generate([[5, 9], [14]], SamplingParams(max_new_tokens=2), given)
        assert str(refused.value) == (
            f"adapters={given!r}: give a loaded adapter's name for all prompts or one per prompt (None: the base "
            "model); use_tqdm, vLLM's third argument, is a keyword here: generate(prompts, params, use_tqdm=True)"
        )
    assert engine.stats().waiting == 0 and not engine.running  # refused before any prompt was added


def test_transformers_and_vllm_loading_keywords_are_taken_or_refused_naming_them(base):
    """from_pretrained(path, trust_remote_code=True), low_cpu_mem_usage=True (transformers' and vLLM's keywords) and
    revision= raised "TypeError: Engine.__init__() got an unexpected keyword argument", saying nothing of why. The
    first two are taken without effect (no checkpoint code runs; the weights are always read one tensor at a time),
    but as True or False: trust_remote_code="no" was taken too; a Hub revision is refused naming it, as the folder is
    read as it is on disk."""
    plain = Engine.from_pretrained(base, kv_cache_memory=1 << 22)
    taken = Engine.from_pretrained(base, kv_cache_memory=1 << 22, trust_remote_code=True, low_cpu_mem_usage=True)
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    assert taken.generate([[5, 9]], greedy)[0].token_ids == plain.generate([[5, 9]], greedy)[0].token_ids
    for keyword in ("trust_remote_code", "low_cpu_mem_usage"):
        with pytest.raises(ValueError, match=rf"^{keyword}='no' must be True or False$"):
            Engine.from_pretrained(base, **{keyword: "no"})
    with pytest.raises(ValueError) as refused:
        Engine.from_pretrained(base, revision="v1.0")
    assert str(refused.value) == (
        f"revision='v1.0' names a revision of a Hugging Face Hub repository, but seekstack reads the folder {base} "
        "as it is on disk and downloads nothing: fetch that revision with `hf download REPO --revision v1.0 "
        "--local-dir FOLDER`, give FOLDER and leave revision out"
    )


def test_vllms_has_unfinished_requests_and_get_tokenizer_are_the_engines_own(model, tokenizer):
    """vLLM's LLMEngine.has_unfinished_requests() and LLM.get_tokenizer() raised AttributeError, though the engine
    answers both (has_unfinished, .tokenizer): the vLLM names give the same answers, no second copy."""
    engine = Engine(model, tokenizer)
    assert engine.get_tokenizer() is tokenizer
    assert engine.get_tokenizer().decode(engine.get_tokenizer().encode("def f(x):")) == "def f(x):"
    assert engine.has_unfinished_requests() is False
    request = engine.add_request([5, 9], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    assert engine.has_unfinished_requests() is True
    while engine.has_unfinished_requests():
        finished = [output.request_id for output in engine.step() if output.finished]
    assert finished == [request] and engine.has_unfinished() is False
    assert Engine.has_unfinished_requests is Engine.has_unfinished


def test_chats_third_argument_is_use_tqdm_as_vllms_not_the_generation_prompt(model, tokenizer, capsys):
    """vLLM's LLM.chat(messages, sampling_params, use_tqdm): here the third was add_generation_prompt, so
    chat(messages, params, False), vLLM's call without a bar, rendered no generation prompt and the model went on
    writing the user's turn, with no error."""
    engine, messages = Engine(model, tokenizer), [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    [reply] = engine.chat(messages, params)
    assert reply.prompt == tokenizer.render_chat(messages, add_generation_prompt=True)
    [quiet] = engine.chat(messages, params, False)
    assert (quiet.prompt, quiet.token_ids, capsys.readouterr().err) == (reply.prompt, reply.token_ids, "")
    [shown] = engine.chat(messages, params, True)
    assert (shown.prompt, shown.token_ids) == (reply.prompt, reply.token_ids)
    assert "Processed prompts" in capsys.readouterr().err


def test_add_request_in_vllms_argument_order_is_refused_saying_this_order(model, tokenizer):
    """vLLM's LLMEngine.add_request(request_id, prompt, params) here was refused "params must be SamplingParams, got
    list: SamplingParams(max_new_tokens=64, ...)", though the caller had given SamplingParams, one place later."""
    engine = Engine(model, tokenizer)
    with pytest.raises(TypeError) as refused:
        engine.add_request("req-7", [5, 9], SamplingParams(max_new_tokens=2))
    assert str(refused.value) == (
        "add_request takes (prompt_ids, params, request_id); these read as vLLM's LLMEngine.add_request(request_id, "
        "prompt, params): call add_request(prompt_ids, params, request_id='req-7')"
    )
    assert engine.stats().waiting == 0
    assert engine.add_request([5, 9], SamplingParams(max_new_tokens=2), "req-7") == "req-7"


@pytest.mark.parametrize(
    "given, told",
    [
        ({"gpu_memory_utilization": 0.5}, "gpu_memory_utilization= is vLLM's LLM keyword, not taken here: give the "
         "latent cache's budget in bytes, kv_cache_memory= (default: half the free memory of each device)"),
        ({"seed": 0}, "seed= is vLLM's LLM keyword, not taken here: seed a request with SamplingParams(seed=), or all "
         "of them with torch.manual_seed(s) before generate"),
        ({"enforce_eager": "False"}, "enforce_eager='False' is vLLM's LLM keyword, taken here only as "
         "enforce_eager=True or enforce_eager=False: the engine decodes eagerly unless given compile=True (or "
         "compile=None: once eager decoding has taken as long as a compile)"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size=2 is vLLM's LLM keyword, taken here only as "
         "tensor_parallel_size=1: the engine runs in one process; spread a model over devices with device_map="),
        ({"pipeline_parallel_size": True}, "pipeline_parallel_size=True is vLLM's LLM keyword, taken here only as "
         "pipeline_parallel_size=1: the engine runs in one process; spread a model over devices with device_map="),
        ({"enable_lora": False}, "enable_lora=False is vLLM's LLM keyword, taken here only as enable_lora=True: LoRA "
         "adapters are always on: pass generate's lora_request=LoRARequest(name, id, DIR) as vLLM's, or load them "
         "with adapters={name: DIR} or load_adapter(name, DIR)"),
    ],
)  # fmt: skip
def test_vllms_llm_keywords_are_refused_saying_what_does_their_work_here(tmp_path, given, told):
    """Engine.from_pretrained(path, gpu_memory_utilization=0.5), as a vLLM script builds LLM(model, ...), was a bare
    "TypeError: Engine.__init__() got an unexpected keyword argument", raised only once every weight had loaded."""
    with pytest.raises(TypeError) as refused:
        Engine.from_pretrained(tmp_path / "not-read", **given)
    assert str(refused.value) == told


@pytest.mark.parametrize("keyword", ["speculative", "prefix_caching", "adaptive_drafts", "eager_lone_row"])
def test_a_switch_given_as_text_is_refused_not_read_as_true(model, tokenizer, tmp_path, keyword):
    """Engine(model, tokenizer, speculative="false") (a setting read from a file or the environment as text) turned
    speculative decoding on, silently: every non-empty text is true. Engine.from_pretrained refuses it too, before
    anything is read (speculative="no" reached load_pretrained as mtp="no", loading the MTP weights)."""
    for value in ("false", None):
        with pytest.raises(ValueError, match=rf"^{keyword}={value!r} must be True or False$"):
            Engine(model, tokenizer, **{keyword: value})
        with pytest.raises(ValueError, match=rf"^{keyword}={value!r} must be True or False$"):
            Engine.from_pretrained(tmp_path / "not-read", **{keyword: value})


@pytest.mark.parametrize(
    ("given", "told"),
    [
        ({"max_batch_size": "8"}, "max_batch_size='8' must be a whole number >= 1"),
        ({"block_size": 0}, "block_size=0 must be >= 1"),
        # None is the default of max_model_len, num_blocks, kv_cache_memory, compile only: these failed once used
        ({"max_batch_size": None}, "max_batch_size=None must be a whole number >= 1"),
        ({"draft_tokens": None}, "draft_tokens=None must be a whole number >= 1"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory: size 'lots': expected a number with an optional unit"),
        ({"draft_tokens": 99}, "draft_tokens=99: at most 16"),
        ({"compile": "yes"}, "compile='yes' must be True (decode compiled from the first step), False (never) or None"),
        ({"num_blocks": "3"}, "num_blocks='3': the cache needs a whole number of at least 2 blocks"),
        ({"draft_vocab": -1}, "draft_vocab=-1 must be a whole number >= 0"),
    ],
)
def test_a_wrong_count_or_compile_is_refused_before_anything_is_read(tmp_path, given, told):
    """Engine.from_pretrained(path, max_batch_size="8") loaded every weight (minutes, on a real-size model) before
    Engine refused the count; compile="yes" was taken by both and decoded eagerly, as compile=False does."""
    with pytest.raises(ValueError) as refused:
        Engine.from_pretrained(tmp_path / "not-read", **given)
    assert str(refused.value).startswith(told)


def test_a_mistyped_keyword_is_refused_naming_the_closest_before_any_weight_loads(tmp_path):
    """Engine.from_pretrained(path, max_batch=4) loaded every weight, then raised Python's bare "TypeError:
    Engine.__init__() got an unexpected keyword argument 'max_batch'" (minutes, on a real-size model)."""
    for given, closest in (("max_batch", "max_batch_size"), ("dtyp", "dtype")):
        with pytest.raises(TypeError) as refused:
            Engine.from_pretrained(tmp_path / "not-read", **{given: 4})
        assert str(refused.value).startswith(
            f"Engine.from_pretrained got an unexpected keyword argument {given!r}: did you mean {closest!r}? known "
            "fields are tokenizer, dtype, adapter,"
        )


def test_vllms_llm_keywords_asking_for_what_the_engine_does_are_taken_and_its_names_read_as_the_engines(base, tmp_path):
    """vLLM's LLM(model, tensor_parallel_size=1, enforce_eager=True, max_num_seqs=4, enable_prefix_caching=False) was
    refused keyword by keyword, though one process, eager decoding, four requests a batch and no prefix cache is what
    the engine does given its own names for them (max_batch_size, prefix_caching); enable_lora=True, which every vLLM
    LoRA script passes, was refused as "unexpected keyword argument 'enable_lora': did you mean 'max_loras'?"."""
    taken = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "enforce_eager": True, "enable_lora": True}
    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_num_seqs=4, enable_prefix_caching=False, **taken)
    assert (engine.max_batch_size, engine.cache.prefix_caching, engine.decode_compiled) == (4, False, False)
    defaults = Engine.from_pretrained(  # vLLM's None: its default, here the engine's (prefix caching on, not off)
        base, kv_cache_memory=1 << 22, max_num_seqs=None, enable_prefix_caching=None
    )
    assert (defaults.max_batch_size, defaults.cache.prefix_caching) == (EngineOptions.max_batch_size, True)
    # enforce_eager=False, vLLM's default, only allows CUDA graphs: taken, eager as the engine's default, and beside
    # compile=None (refused before: "taken here only as enforce_eager=True"), which it leaves to compile later
    allowed = Engine.from_pretrained(base, kv_cache_memory=1 << 22, enforce_eager=False)
    later = Engine.from_pretrained(base, kv_cache_memory=1 << 22, enforce_eager=False, compile=None)
    assert (allowed.decode_compiled, allowed._eager_seconds_left, later.decode_compiled) == (False, None, False)
    assert later._eager_seconds_left == COMPILE_AFTER_SECONDS
    for given, told in (
        ({"max_num_seqs": 4, "max_batch_size": 8}, "max_num_seqs=4 beside max_batch_size=8: it is vLLM's name for "
         "max_batch_size"),
        ({"enable_prefix_caching": True, "prefix_caching": False}, "enable_prefix_caching=True beside "
         "prefix_caching=False: it is vLLM's name for prefix_caching"),
        ({"enforce_eager": True, "compile": None}, "enforce_eager=True beside compile=None: the engine decodes eagerly "
         "unless given compile=True (or compile=None: once eager decoding has taken as long as a compile); leave one "
         "out"),
        # a wrong value is named by the keyword given, not the engine's (was: "prefix_caching='no' must be ...")
        ({"enable_prefix_caching": "no"}, "enable_prefix_caching='no' must be True or False"),
        ({"max_num_seqs": "8"}, "max_num_seqs='8' must be a whole number >= 1"),
        ({"max_num_seqs": 0}, "max_num_seqs=0 must be >= 1"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as refused:
            Engine.from_pretrained(tmp_path / "not-read", **given)
        assert str(refused.value) == told


def test_an_engine_built_on_a_model_reads_its_generation_config_as_from_pretrained_does(base, tmp_path):
    """transformers' generate reads model.generation_config whoever loaded the model; Engine(model, tokenizer) read
    none of it, where Engine.from_pretrained read the folder's generation_config.json: both now take its sampling
    defaults and its eos_token_id from the model."""
    import json
    import shutil

    import seekstack
    from seekstack.schema import ConfigError
    from seekstack.tokenizer import Tokenizer

    folder = shutil.copytree(base, tmp_path / "release")
    settings = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5, "eos_token_id": [1, 7]}
    (folder / "generation_config.json").write_text(json.dumps(settings))
    model, tokenizer = seekstack.load_pretrained(folder), Tokenizer.from_file(folder)
    built, loaded = Engine(model, tokenizer), Engine.from_pretrained(folder)
    for engine in (built, loaded):
        assert engine.sampling_defaults == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5}
        assert engine.eos_ids == {tokenizer.eos_id, 1, 7}
        assert engine.get_default_sampling_params().max_new_tokens == 5
    model.generation_config = {"eos_token_id": "seven"}
    with pytest.raises(ConfigError, match="model.generation_config: field 'eos_token_id' has value 'seven'"):
        Engine(model, tokenizer)


def test_vllms_priority_is_taken_as_zero_for_each_prompt_and_refused_otherwise(model, tokenizer):
    """generate(prompts, params, priority=[0, 0]), vLLM's, was a bare TypeError (an unexpected keyword argument); all
    zeros (vLLM's default) are taken, first come first served, and another priority is refused before any prompt is
    added, as vLLM's default scheduling policy refuses it."""
    engine, greedy = Engine(model, tokenizer), SamplingParams(max_new_tokens=2, temperature=0)
    taken = engine.generate([[5, 9], [7, 3]], greedy, priority=[0, 0])
    assert [c.token_ids for c in taken] == [c.token_ids for c in engine.generate([[5, 9], [7, 3]], greedy)]
    with pytest.raises(ValueError) as refused:
        engine.generate([[5, 9], [7, 3]], greedy, priority=[1, 0])
    assert str(refused.value) == (
        "priority=[1, 0]: vLLM's, taken here only as 0 for each prompt, its default: the engine admits requests first "
        "come, first served, as vLLM's default scheduling policy, which refuses other priorities too; add the urgent "
        "prompts first, or in a generate call of their own"
    )
    for text in ("0", ["0", 0], "1", [None, 0]):  # refused as a priority other than 0, "taken here only as 0"
        with pytest.raises(TypeError, match=r"^priority=(.*) holds ('[01]', a str|None, a NoneType): give vLLM's int"):
            engine.generate([[5, 9], [7, 3]], greedy, priority=text)
    assert not engine.has_unfinished()


def test_priority_is_one_per_prompt_or_one_int_for_all(model, tokenizer):
    """priority=[0] with two prompts, or [0, 0, 0], was taken (only any() was checked), where vLLM refuses a length
    other than the prompts'; priority=0, an int a newer vLLM takes as one per prompt, was a bare TypeError."""
    engine, greedy = Engine(model, tokenizer), SamplingParams(max_new_tokens=2, temperature=0)
    plain = [c.token_ids for c in engine.generate([[5, 9], [7, 3]], greedy)]
    assert [c.token_ids for c in engine.generate([[5, 9], [7, 3]], greedy, priority=0)] == plain
    for given in ([0], [0, 0, 0]):
        with pytest.raises(ValueError) as refused:
            engine.generate([[5, 9], [7, 3]], greedy, priority=given)
        assert str(refused.value) == (
            f"2 prompts but {len(given)} priority: give one per prompt (0), one int for all, or leave priority out"
        )
        assert not engine.has_unfinished()
    with pytest.raises(ValueError, match=r"^priority=2: vLLM's, taken here only as 0"):
        engine.generate([[5, 9], [7, 3]], greedy, priority=2)


def test_a_priority_given_as_a_tensor_or_a_float_is_read_as_its_number(model, tokenizer):
    """priority=torch.tensor(0), a 0-d tensor (a numpy scalar's torch twin), and priority=0.0 were bare TypeErrors
    ('iteration over a 0-d tensor', "'float' object is not iterable"), and priority='1' read as one per letter: each is
    now one priority for all, 0 taken, any other refused by its value."""
    import torch

    engine, greedy = Engine(model, tokenizer), SamplingParams(max_new_tokens=2, temperature=0)
    plain = [c.token_ids for c in engine.generate([[5, 9], [7, 3]], greedy)]
    for zero in (torch.tensor(0), torch.tensor([0, 0]), 0.0):
        assert [c.token_ids for c in engine.generate([[5, 9], [7, 3]], greedy, priority=zero)] == plain
    for given, shown in ((torch.tensor(1), "1"), (1.5, "1.5")):  # text ('1'): refused as no number
        with pytest.raises(ValueError, match=rf"^priority={shown}: vLLM's, taken here only as 0"):
            engine.generate([[5, 9], [7, 3]], greedy, priority=given)
    assert not engine.has_unfinished()


def test_an_adapter_a_lora_request_of_another_thread_resolved_is_not_unloaded_before_its_requests_are_added(
    base, adapter_folders
):
    """Thread 1's generate(lora_request "a") loaded "a" and then added its requests; a second thread's lora_request
    "b" in between (max_loras=1) saw "a" loaded with no request on it, unloaded it for "b", and thread 1 was refused
    ("no adapter 'a'") for an adapter it had just asked for. An adapter a generate call resolved is now held until its
    requests are added: the second thread is refused naming the slot "a" takes, and thread 1 runs on "a"."""
    import threading

    engine = Engine.from_pretrained(base, kv_cache_memory=1 << 22, max_loras=1)
    asked = {name: LoRARequest(name, seed, adapter_folders[seed]) for name, seed in (("a", 1), ("b", 2))}
    greedy = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    [alone] = engine.generate([[5, 9]], greedy, lora_request=asked["a"])
    engine.unload_adapter("a")
    resolved, go, results = threading.Event(), threading.Event(), {}
    add_awaited = engine._add_awaited

    def add_after_the_other_thread(*args, **kwargs):  # widens thread 1's window between resolving and adding
        if not resolved.is_set():
            resolved.set()
            go.wait(timeout=30)
        return add_awaited(*args, **kwargs)

    engine._add_awaited = add_after_the_other_thread

    def first():
        try:
            results["a"] = engine.generate([[5, 9]], greedy, lora_request=asked["a"])[0].token_ids
        except ValueError as error:
            results["a"] = str(error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert resolved.wait(timeout=30)
        with pytest.raises(ValueError, match=r"^field 'max_loras': all 1 adapter slots are taken, so adapter 'b'"):
            engine.generate([[5, 9]], greedy, lora_request=asked["b"])
    finally:
        go.set()
        thread.join(timeout=60)
    assert results["a"] == alone.token_ids
    engine._add_awaited = add_awaited
    [after] = engine.generate([[5, 9]], greedy, lora_request=asked["b"])  # "a" unused again: it gives up its slot
    assert after.token_ids != alone.token_ids
    assert engine.lora.folders == {"b": adapter_folders[2]}


def test_model_generation_config_reads_and_sets_fields_as_attributes_as_transformers_and_the_engine_samples_by_them(
    model, tokenizer
):
    """model.generation_config was a plain dict: transformers' `model.generation_config.max_new_tokens` (read or set)
    raised AttributeError. Its fields are attributes too now (a transformers field left unset reads None, a typo is
    refused naming what it holds), `to_dict()` gives the dict, and an engine built on the model samples by them."""
    model.generation_config = {"temperature": 0.6}
    try:
        settings = model.generation_config
        assert (settings.temperature, settings.max_new_tokens, settings["temperature"]) == (0.6, None, 0.6)
        settings.max_new_tokens = 5
        assert settings.to_dict() == {"temperature": 0.6, "max_new_tokens": 5} and type(settings.to_dict()) is dict
        assert Engine(model, tokenizer).sampling_defaults == {"temperature": 0.6, "max_new_tokens": 5}
        with pytest.raises(AttributeError, match="^generation config has no field 'tempreature': it holds temperature"):
            settings.tempreature  # noqa: B018
    finally:
        model.generation_config = None


def test_vllms_chat_keywords_content_format_and_mm_processor_kwargs_are_taken_at_their_defaults_alone(model, tokenizer):
    """chat(messages, params, chat_template_content_format="auto") and mm_processor_kwargs=None, vLLM's LLM.chat
    keywords at their defaults, were a bare TypeError (an unexpected keyword argument): the defaults are taken, as
    the engine renders either content form and reads no images; other values are refused naming the keyword."""
    engine, greedy = Engine(model, tokenizer), SamplingParams(max_new_tokens=2, temperature=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    [plain] = engine.chat(messages, greedy)
    [taken] = engine.chat(messages, greedy, chat_template_content_format="auto", mm_processor_kwargs=None)
    assert (taken.prompt, taken.token_ids) == (plain.prompt, plain.token_ids)
    with pytest.raises(ValueError) as refused:
        engine.chat(messages, greedy, chat_template_content_format="openai")
    assert str(refused.value) == (
        "chat_template_content_format='openai' (vLLM's) is taken as 'auto', its default, alone: content given as a "
        "string or as OpenAI's text parts ([{'type': 'text', 'text': ...}]) is rendered in the form the chat template "
        "reads; leave it out"
    )
    with pytest.raises(ValueError, match=r"^mm_processor_kwargs= \(vLLM's\) is not taken: .* this engine serves text"):
        engine.chat(messages, greedy, mm_processor_kwargs={"num_crops": 4})
    assert not engine.has_unfinished()
