"""The lm-evaluation-harness backend: each method against direct computation on the model, and per-request
log-likelihoods against lm_eval's own HF backend on the same checkpoint loaded through transformers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from seekstack.eval.harness import SeekstackLM  # noqa: E402

ATOL = 1e-4
PAIRS = [
    ("def add(a, b):\n", "    return a + b\n"),
    ("import os\nimport ", "sys"),
    ("", "class Point:\n    pass\n"),
    ("for line in lines:", " print(line)"),  # the trailing space moves into the continuation
    ("x = [1, 2, 3]\n" * 8, "y = x[0]"),
]
# a few-shot prompt whose greedy continuation by the micro model holds <｜tool▁outputs▁end｜> (a special token), "._"
# (token 316) and "ch"
FEW_SHOT = (
    "Question: What is 48 plus 27?\nAnswer:  75\n\nQuestion: What is 3 plus 37?\nAnswer:  40\n\n"
    "Question: What is 30 plus 8?\nAnswer:"
)
TEXTS = ["def main():\n    return 0\n", "import sys\n\n\nclass Foo(object):\n    def __init__(self):\n        pass\n"]


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@pytest.fixture(scope="module")
def ours(checkpoint) -> SeekstackLM:
    # max_gen_toks below the micro model's 256-token context (the default 256 would leave no room for a prompt)
    return SeekstackLM(pretrained=checkpoint, batch_size=2, max_gen_toks=32)


def direct_logprobs(lm: SeekstackLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one unbatched forward."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registered_as_lm_eval_model_seekstack():
    assert get_model("seekstack") is SeekstackLM


def test_loglikelihood_is_the_sum_over_the_continuation_of_one_forward(ours):
    results = ours.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, results, strict=True):
        context_ids = ours.tok_encode(context.rstrip()) if context else [ours.prefix_token_id]
        whole = ours.tok_encode(context + continuation)
        ids = [ours.prefix_token_id, *whole] if not context else whole
        n_continuation = len(ids) - len(context_ids)
        expected = direct_logprobs(ours, ids)[-n_continuation:].sum().item()
        assert logprob == pytest.approx(expected, abs=ATOL)


def test_loglikelihood_runs_the_head_on_the_scored_positions_alone_with_the_same_results(ours, monkeypatch):
    """The head ran over every position of a batch, though only each row's continuation is read (~9% of a 4 x 512
    eval forward): it runs on those alone now, and every log-likelihood is bitwise the one of the whole logits."""
    head_rows = []
    hook = ours.model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(out.shape[:-1].numel()))
    try:
        scored = ours.loglikelihood(requests("loglikelihood", PAIRS))
    finally:
        hook.remove()
    longest = max(len(ours.tok_encode(context + continuation)) for context, continuation in PAIRS)
    assert sum(head_rows) < 2 * longest, f"the head ran on {sum(head_rows)} positions"
    forward = ours.model.forward

    def whole_logits_then_read(input_ids, *args, logits_at=None, **kwargs):
        output = forward(input_ids, *args, **kwargs)
        output.logits = output.logits[torch.arange(len(input_ids))[:, None], logits_at]
        return output

    monkeypatch.setattr(ours.model, "forward", whole_logits_then_read)
    assert scored == ours.loglikelihood(requests("loglikelihood", PAIRS))


def test_batch_size_auto_sizes_its_batch_by_the_positions_the_head_runs_on(checkpoint, monkeypatch):
    """The search for batch_size="auto" ran the head over every position, which the scoring forwards no longer do: it
    picked fewer rows than fit. Its forward now asks for the longest continuation's positions, as theirs do."""
    lm = SeekstackLM(pretrained=checkpoint, batch_size="auto", max_batch_size=4, max_gen_toks=32)
    forward, asked = lm.model.forward, []

    def recording(input_ids, *args, logits_at=None, **kwargs):
        asked.append(None if logits_at is None else tuple(logits_at.shape))
        return forward(input_ids, *args, logits_at=logits_at, **kwargs)

    monkeypatch.setattr(lm.model, "forward", recording)
    lm.loglikelihood(requests("loglikelihood", PAIRS))
    assert asked[0] == (4, max(scored for _, scored in asked[1:])), asked


@pytest.mark.parametrize(("context", "continuation"), [(" ", "x = 1"), ("\n", "\n\n"), ("  ", "  ")])
def test_a_context_of_whitespace_alone_is_scored_after_bos_as_an_empty_one(ours, context, continuation):
    """lm_eval moves a context's trailing whitespace into the continuation, which left a context of whitespace alone
    without a token: the forward failed ('cannot reshape tensor of 0 elements') or scored the wrong positions."""
    [(logprob, greedy)] = ours.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    ids = [ours.prefix_token_id, *ours.tok_encode(context + continuation)]
    assert logprob == pytest.approx(direct_logprobs(ours, ids).sum().item(), abs=ATOL)
    [(empty_context_logprob, _)] = ours.loglikelihood(requests("loglikelihood", [("", context + continuation)]))
    assert logprob == pytest.approx(empty_context_logprob, abs=ATOL) and not greedy


def test_a_model_the_engine_cannot_serve_is_scored_and_only_its_generation_refused(checkpoint_3d):
    """attention_variant=3d has no cached decode path: log-likelihoods run on its forward (no engine is made for
    them), and generate_until meets the engine's refusal."""
    lm = SeekstackLM(pretrained=checkpoint_3d, max_gen_toks=32)
    ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", [PAIRS[0]]))
    context, whole = lm.tok_encode(PAIRS[0][0].rstrip()), lm.tok_encode("".join(PAIRS[0]))  # as lm_eval cuts them
    assert logprob == pytest.approx(direct_logprobs(lm, whole)[len(context) - 1 :].sum().item(), abs=ATOL)
    with pytest.raises(ValueError, match="attention_variant='3d' is a training ablation without a cached decode"):
        lm.generate_until(requests("generate_until", [("def f(x):", {"until": ["\n"], "max_gen_toks": 4})]))


def test_batch_size_auto_scores_in_the_largest_batch_the_memory_holds(checkpoint, ours, monkeypatch, capsys):
    """lm_eval's `--batch_size auto` was refused; it now finds its batch size as the HF backend does, from 64 down
    (accelerate's search) while a forward runs out of memory: here above 20 rows."""
    lm = SeekstackLM(pretrained=checkpoint, batch_size="auto", max_gen_toks=32)
    forward, widths = lm.model.forward, []

    def forward_in_20_rows(input_ids, *args, **kwargs):
        widths.append(len(input_ids))
        if len(input_ids) > 20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", forward_in_20_rows)
    pairs = requests("loglikelihood", PAIRS * 5)
    scored, expected = lm.loglikelihood(pairs), ours.loglikelihood(pairs)
    assert [greedy for _, greedy in scored] == [greedy for _, greedy in expected]
    assert [logprob for logprob, _ in scored] == pytest.approx([logprob for logprob, _ in expected], abs=ATOL)
    assert widths[0] == 64 and max(widths[widths.index(19) :]) == 19  # 64, 57, 51, ... 22 refused, then 19 rows
    assert "batch_size=auto: 19 requests" in capsys.readouterr().err
    for wrong in ("big", "0", "auto:x"):
        with pytest.raises(ValueError, match="give a number of requests per batch|at least 1"):
            SeekstackLM(pretrained=checkpoint, batch_size=wrong)


def test_requests_of_one_input_are_scored_from_one_forward_as_lm_evals_logits_cache_does(checkpoint, monkeypatch):
    """A multiple choice's one-token answers after one context (MMLU's " A" ... " D") ran a forward each, where the HF
    backend's logits cache runs one: 4x the work (160 such requests of ~200 tokens: 1.61 s, now 0.61 s)."""
    lm = SeekstackLM(pretrained=checkpoint, batch_size=8, max_gen_toks=32)
    contexts = [context for context, _ in PAIRS[:3]]
    pairs = [(context, answer) for context in contexts for answer in (" A", " B", " C", " D")]
    pairs.append(PAIRS[0])  # a request of more than one token
    alone = [lm.loglikelihood(requests("loglikelihood", [pair]))[0] for pair in pairs]
    forward, rows = lm.model.forward, []

    def counted_forward(input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", counted_forward)
    scored = lm.loglikelihood(requests("loglikelihood", pairs))
    assert rows == [4]  # one row per context, and the longer request's own
    assert [logprob for logprob, _ in scored] == pytest.approx([logprob for logprob, _ in alone], abs=ATOL)
    assert [greedy for _, greedy in scored] == [greedy for _, greedy in alone]


def test_the_float32_log_softmax_is_taken_over_the_scored_positions_alone(ours, monkeypatch):
    """The whole batch's logits went through a float32 log-softmax, (B, T, V) twice over beside the model's logits:
    16 rolling windows of 256 tokens on a 65,536-token vocabulary peaked 3.1 GB above the model, now 2.2 GB (bfloat16
    weights: 3.2 GB, now 1.3 GB), the same scores."""
    log_softmax, shapes = F.log_softmax, []

    def recorded_log_softmax(logits, *args, **kwargs):
        shapes.append(tuple(logits.shape))
        return log_softmax(logits, *args, **kwargs)

    monkeypatch.setattr(F, "log_softmax", recorded_log_softmax)
    pairs = [pair for pair in PAIRS if pair[0]] + [(PAIRS[0][0], " A"), (PAIRS[0][0], " B")]  # one input, twice
    ours.loglikelihood(requests("loglikelihood", pairs))
    longest: dict[tuple[int, ...], int] = {}  # each input's longest continuation
    for context, continuation in pairs:
        context_ids, continuation_ids = ours._encode_pair(context, continuation)
        key = tuple(context_ids + continuation_ids[:-1])
        longest[key] = max(longest.get(key, 0), len(continuation_ids))
    assert len(longest) == len(pairs) - 1
    assert sorted(shapes) == sorted((length, ours.model.config.vocab_size) for length in longest.values())


def test_is_greedy_true_exactly_when_the_continuation_is_the_argmax(ours):
    context = ours.tok_encode("def add(a, b):\n")
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(ours.model(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    last_changed = greedy[:-1] + [(greedy[-1] + 1) % ours.model.config.vocab_size]
    [(_, first), (_, second)] = ours._loglikelihood_tokens([(None, context, greedy), (None, context, last_changed)])
    assert first and not second


def test_loglikelihood_rolling_is_the_whole_text_after_bos_within_max_length(ours):
    results = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    for text, logprob in zip(TEXTS, results, strict=True):
        expected = direct_logprobs(ours, [ours.prefix_token_id, *ours.tok_encode(text)]).sum().item()
        assert logprob == pytest.approx(expected, abs=ATOL)


def test_loglikelihood_rolling_in_windows_sums_each_window_given_the_tokens_before_it(checkpoint):
    lm = SeekstackLM(pretrained=checkpoint, batch_size=3, max_length=8)
    ids = lm.tok_encode(TEXTS[1])
    assert len(ids) > 2 * lm.max_length
    [logprob] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXTS[1],)]))
    padded = [lm.prefix_token_id, *ids]
    # Window w is a fresh forward over the 8 tokens (BOS first) before token 8w + 8, predicting tokens
    # [8w, 8w + 8); the last, shorter window still reads a full 8 tokens and predicts only the rest.
    expected = 0.0
    for start in range(0, len(ids), lm.max_length):
        width = min(lm.max_length, len(ids) - start)
        window = padded[max(0, start + width - lm.max_length) : start + width + 1]
        expected += direct_logprobs(lm, window)[-width:].sum().item()
    assert logprob == pytest.approx(expected, abs=ATOL)
    assert logprob != pytest.approx(direct_logprobs(lm, padded).sum().item(), abs=1e-2)  # windows cut the context


def test_generate_until_is_the_greedy_argmax_loop_cut_at_the_stop_string(ours):
    contexts = ["def add(a, b):\n", "import os\n"]
    arguments = [(c, {"until": ["\n\n"], "max_gen_toks": 12}) for c in contexts]
    arguments.append((contexts[0], {"until": [], "max_gen_toks": 5}))
    texts = ours.generate_until(requests("generate_until", arguments))
    for (context, kwargs), text in zip(arguments, texts, strict=True):
        ids = ours.tok_encode(context)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(kwargs["max_gen_toks"]):
                token = int(ours.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == ours.eot_token_id:
                    break
                new.append(token)
        expected = ours.tok_decode([token for token in new if token not in ours.tokenizer_.special_ids])
        for stop in kwargs["until"]:
            expected = expected.split(stop)[0]
        assert text == expected


def test_generate_until_continues_an_empty_context_from_bos(ours):
    """An empty context (unconditional generation) reached the engine as no tokens and failed ('empty prompt: give
    at least one token', naming no request); it is continued from BOS, on which lm_eval's loglikelihood conditions an
    empty context."""
    texts = ours.generate_until(requests("generate_until", [("", {"until": [], "max_gen_toks": 6})]))
    new: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            new.append(int(ours.model(torch.tensor([[ours.prefix_token_id, *new]])).logits[0, -1].argmax()))
    assert ours.eot_token_id not in new and texts == [ours.tok_decode(new)]


def test_loglikelihoods_equal_lm_evals_hf_backend_on_the_transformers_model(checkpoint, ours):
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32")
    pairs = requests("loglikelihood", PAIRS)
    rolling = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    ours_pairs, theirs_pairs = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(ours_pairs, theirs_pairs, strict=True):
        assert our_logprob == pytest.approx(their_logprob, abs=ATOL)
        assert our_greedy == their_greedy
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=ATOL)


@pytest.mark.parametrize("think_end_token", ["ch", "316"])  # a text the micro model writes here, and a token id
def test_a_think_end_token_scores_what_follows_it_as_lm_evals_hf_backend_does(checkpoint, think_end_token):
    """The HF backend's think_end_token model arg (a reasoning model's </think>) was refused ('unexpected keyword
    argument'), so such a model was scored on its thinking too."""
    from lm_eval.models.huggingface import HFLM

    ours = SeekstackLM(pretrained=checkpoint, max_gen_toks=32, think_end_token=think_end_token)
    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=1, dtype="float32",
                  think_end_token=think_end_token)  # fmt: skip
    arguments = [(FEW_SHOT, {"until": ["\n"], "max_gen_toks": 16}), ("def f(x):", {"until": [], "max_gen_toks": 8})]
    texts = ours.generate_until(requests("generate_until", arguments))
    assert texts == theirs.generate_until(requests("generate_until", arguments))
    assert texts[0].startswith("ubrue") if think_end_token == "ch" else texts[0].startswith("ch    ub")


def test_generated_text_leaves_special_tokens_out_as_lm_evals_hf_backend_decodes_it(checkpoint, ours):
    """The micro model writes <｜tool▁outputs▁end｜> in this continuation: the HF backend's text leaves it out (its
    decode's skip_special_tokens), ours kept it, so exact_match could differ; a stop string still sees it."""
    from lm_eval.models.huggingface import HFLM

    prompt, kwargs = FEW_SHOT, {"until": ["\n"], "max_gen_toks": 16}
    arguments = [(prompt, kwargs), (prompt, {**kwargs, "until": ["<｜tool▁outputs▁end｜>"]})]
    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=1, dtype="float32")
    expected = theirs.generate_until(requests("generate_until", arguments))
    assert ours.generate_until(requests("generate_until", arguments)) == expected
    [kept] = ours.generate_until(requests("generate_until", [(prompt, {**kwargs, "skip_special_tokens": False})]))
    assert kept.replace("<｜tool▁outputs▁end｜>", "") == expected[0] != kept


def test_sampled_generation_repeats_under_torchs_seed_whatever_requests_run_beside_it(ours):
    sampled = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    request = Instance("generate_until", {}, ("def add(a, b):\n", sampled), 0)
    neighbour = Instance("generate_until", {}, ("import os\n", sampled), 1)

    def generate(seed: int, batch: list[Instance]) -> list[str]:
        torch.manual_seed(seed)  # what lm_eval's simple_evaluate does before it runs the requests
        return ours.generate_until(batch)

    [alone] = generate(1234, [request])
    assert generate(1234, [neighbour, request])[1] == alone
    first, repeat = generate(1234, [request, request])  # lm_eval repeats a request for k samples: each its own
    assert first == alone and repeat != alone
    assert generate(99, [request]) != [alone]


def test_generation_kwargs_reach_the_engine_and_any_it_cannot_apply_are_refused(ours, monkeypatch):
    taken = []
    monkeypatch.setattr(ours.engine, "generate", lambda prompts, params: taken.extend(params) or [None] * len(prompts))
    monkeypatch.setattr(ours, "_reply_text", lambda completion, sampling: "")
    kwargs = {"until": "\n", "max_gen_toks": 7, "repetition_penalty": 1.5, "min_p": 0.1, "presence_penalty": 0.5}
    ours.generate_until(requests("generate_until", [("x = ", kwargs), ("y = ", {"temperature": 0.7, "top_k": 5})]))
    greedy, sampled = taken
    assert (greedy.max_new_tokens, greedy.stop, greedy.temperature) == (7, ("\n",), 0.0)
    assert (greedy.repetition_penalty, greedy.min_p, greedy.presence_penalty) == (1.5, 0.1, 0.5)
    assert (sampled.temperature, sampled.top_k) == (0.7, 5)  # a temperature above 0 samples, as lm_eval normalizes
    unknown = "generate_until request 2 of 2: generation kwargs 'bogus_key', 'no_repeat_ngram_size' not supported"
    for bad, message in (
        ({"no_repeat_ngram_size": 2, "bogus_key": 3}, unknown),
        ({"do_sample": True, "temperature": 1.0, "top_p": 2.0}, "request 2 of 2: generation kwarg 'top_p' has value 2"),
        # the HF backend's generate refuses it ("`temperature` (=0.0) has to be a strictly positive float"); ours
        # decoded greedily, unasked
        ({"do_sample": True, "temperature": 0.0}, "request 2 of 2: do_sample=True with temperature=0: sampling needs"),
        # the HF backend gives generate temperature 0 where the request names none, and generate refuses it; ours
        # sampled at temperature 1, unasked
        (
            {"do_sample": True},
            r"request 2 of 2: do_sample=True with no temperature \(lm_eval's default: 0\): sampling needs",
        ),
        # lm_eval's own float() and int() errors, naming no kwarg; and a do_sample of "false" sampled
        (
            {"temperature": "hot"},
            r"request 2 of 2: generation kwargs \{'temperature': 'hot'\}: could not convert .* a number",
        ),
        (
            {"max_new_tokens": "many"},
            r"request 2 of 2: generation kwargs \{'max_new_tokens': 'many'\}: invalid literal",
        ),
        ({"do_sample": "false", "temperature": 0.5}, "request 2 of 2: generation kwarg 'do_sample' has value 'false'"),
    ):
        with pytest.raises(ValueError, match=message):
            ours.generate_until(requests("generate_until", [("x = ", {}), ("y = ", bad)]))


def test_sampled_requests_draw_as_transformers_samples_its_defaults_then_generation_config(checkpoint, tmp_path):
    """The HF backend samples from the 50 likeliest tokens (transformers' default top_k) and the checkpoint's
    generation_config.json (DeepSeek-R1's top_p 0.95): ours sampled the whole vocabulary at top_p 1."""
    shipped = shutil.copytree(checkpoint, tmp_path / "model")
    (shipped / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.95}))
    taken = []
    for folder in (checkpoint, shipped):
        lm = SeekstackLM(pretrained=folder, max_gen_toks=8)
        lm.engine.generate = lambda prompts, params: taken.extend(params) or [None] * len(prompts)
        lm._reply_text = lambda completion, sampling: ""
        arguments = [("x = ", {"do_sample": True, "temperature": 1.0}),
                     ("x = ", {"do_sample": True, "temperature": 0.9, "top_k": 5}),
                     ("x = ", {"do_sample": False})]  # fmt: skip
        lm.generate_until(requests("generate_until", arguments))
    drawn = [(p.temperature, p.top_k, p.top_p) for p in taken]
    # no generation_config.json: transformers' top_k; then its top_p where the request leaves it (the HF backend
    # passes the request's temperature to generate, never the file's); greedy stays greedy
    assert drawn == [(1.0, 50, 1.0), (0.9, 5, 1.0), (0.0, 0, 1.0), (1.0, 50, 0.95), (0.9, 5, 0.95), (0.0, 0, 1.0)]


CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "And 2+2?"},
]


@pytest.mark.parametrize("gen_prefix", [None, "Answer:"])
def test_apply_chat_template_renders_as_transformers_renders_the_checkpoints_template(checkpoint, ours, gen_prefix):
    messages = [*CHAT, {"role": "assistant", "content": gen_prefix}] if gen_prefix else CHAT
    expected = transformers.AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not gen_prefix, continue_final_message=bool(gen_prefix)
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=not gen_prefix) == expected


def test_a_chat_rendered_with_a_llama_style_bos_is_encoded_with_that_bos_once_as_lm_evals_hf_backend_does(
    checkpoint, tmp_path
):
    """A tokenizer whose tokenizer_config.json names `<s>` its BOS, put first by its post-processor and by its chat
    template: the rendered chat already starts with it, so it is not framed again (tok_encode looked for DeepSeek's
    BOS alone and read [<s>, <s>, ...])."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from tests.infer.support import VOCAB
    from tests.test_tokenizer import stdlib_texts

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator(stdlib_texts(100_000), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", 0)])
    backend.save(str(folder / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template + "assistant:"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = SeekstackLM(pretrained=folder, batch_size=2, max_gen_toks=32)
    theirs = HFLM(pretrained=str(folder), device="cpu", batch_size=2, dtype="float32")
    chat = ours.apply_chat_template(CHAT[1:2])
    assert chat == "<s>user: What is 1+1?\nassistant:"
    assert ours.tok_encode(chat) == theirs.tok_encode(chat) == [0, *ours.tokenizer_.encode(chat.removeprefix("<s>"))]
    pairs = requests("loglikelihood", [(chat, " 2")])
    [(our_logprob, _)], [(their_logprob, _)] = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    assert our_logprob == pytest.approx(their_logprob, abs=ATOL)


def test_lm_evals_results_record_the_tokenizers_special_tokens_and_max_length_as_of_the_hf_backend(checkpoint, ours):
    """lm_eval's results JSON (seekstack eval --log-samples, python -m seekstack.eval.harness --output_path) held no
    tokenizer_pad_token, tokenizer_eos_token, tokenizer_bos_token, eot_token_id or max_length for the seekstack
    backend: lm_eval reads them from a backend's `tokenizer`, which it had none of."""
    from lm_eval.loggers.utils import add_tokenizer_info
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32")
    recorded: dict = {}
    add_tokenizer_info(recorded, ours)
    assert recorded == {
        "tokenizer_pad_token": ["<｜▁pad▁｜>", "2"], "tokenizer_eos_token": ["<｜end▁of▁sentence｜>", "1"],
        "tokenizer_bos_token": ["<｜begin▁of▁sentence｜>", "0"], "eot_token_id": 1, "max_length": 256,
    }  # fmt: skip
    their_record: dict = {}
    add_tokenizer_info(their_record, theirs)
    assert recorded == their_record


def test_lm_evals_results_record_the_models_parameters_and_dtype_as_of_the_hf_backend(checkpoint, ours):
    """lm_eval's results config (simple_evaluate's, written with --output_path) held the seekstack backend's
    model_path and model_type alone, where the HF backend's holds model_num_parameters and model_dtype."""
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32").get_model_info()
    info = ours.get_model_info()
    assert info["model_num_parameters"] == theirs["model_num_parameters"] == 246_864  # no MTP module, as theirs
    assert info["model_dtype"] == theirs["model_dtype"] == torch.float32
    assert (info["model_path"], info["model_type"]) == (str(checkpoint), "deepseek_v3")
    bf16 = SeekstackLM(pretrained=checkpoint, dtype="bfloat16", max_gen_toks=8).get_model_info()
    assert (bf16["model_num_parameters"], bf16["model_dtype"]) == (246_864, torch.bfloat16)


def test_chat_template_is_the_one_checkpoints_ship_and_the_tokenizer_name_is_a_file_name(checkpoint, ours):
    assert ours.chat_template(True) == transformers.AutoTokenizer.from_pretrained(checkpoint).chat_template
    assert ours.chat_template(False) is None
    with pytest.raises(ValueError, match="--apply_chat_template 'chatml': the seekstack backend has one"):
        ours.chat_template("chatml")
    assert "/" not in ours.tokenizer_name and ours.tokenizer_name.endswith("tokenizer.json")


def test_a_cuda_device_on_a_machine_without_cuda_runs_on_the_cpu(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="device 'cuda:0': CUDA is not available here, running on the CPU"):
        lm = SeekstackLM(pretrained=checkpoint, device="cuda:0")  # lm_eval's command line's default device
    assert lm.device == torch.device("cpu") and next(lm.model.parameters()).device.type == "cpu"
    assert SeekstackLM(pretrained=checkpoint).device == torch.device("cpu")


@pytest.mark.parametrize("kind", ["mps", "xpu"])
def test_a_device_of_a_kind_the_machine_lacks_is_refused_naming_what_it_has(checkpoint, monkeypatch, kind):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with pytest.raises(ValueError, match=f"device '{kind}': this machine has no {kind} device; it has cpu$"):
        SeekstackLM(pretrained=checkpoint, device=kind)  # it crashed in torch's kernels with a 300-line traceback


def test_a_continuation_longer_than_max_length_is_refused_naming_the_request(checkpoint):
    lm = SeekstackLM(pretrained=checkpoint, max_length=8)
    long = "x = [1, 2, 3, 4, 5, 6, 7, 8, 9]"
    assert len(lm.tok_encode(long)) > 8
    said = r"loglikelihood request 2 of 2 \(continuation 'x = \[1, 2,.*: the continuation is \d+ tokens, more than "
    with pytest.raises(ValueError, match=said + "max_length=8"):
        lm.loglikelihood(requests("loglikelihood", [("a = ", "1"), ("a = ", long)]))


@pytest.mark.parametrize("pair", [("x = r", "eturn"), ("def f(x):", "")])  # " return" is one token; nothing
def test_a_continuation_that_adds_no_token_to_its_context_is_refused_not_scored_certain(ours, pair):
    """lm_eval scores the tokens of context + continuation past the context's own: where the continuation merges into
    the context's last token (or is empty) there are none, and the request scored (0.0, True), a certainty that wins
    any multiple choice; lm_eval's HF backend stops on a bare AssertionError."""
    assert ours._encode_pair(*pair)[1] == []
    said = rf"loglikelihood request 2 of 2 \(context ending {re.escape(repr(pair[0]))}, continuation "
    with pytest.raises(ValueError, match=rf"{said}{re.escape(repr(pair[1]))}\): the continuation adds no token to the"):
        ours.loglikelihood(requests("loglikelihood", [PAIRS[0], pair]))


def test_generation_that_leaves_no_room_for_the_prompt_is_refused_naming_max_gen_toks_and_max_length(
    checkpoint, monkeypatch
):
    lm = SeekstackLM(pretrained=checkpoint, max_length=20)  # max_gen_toks: the default 256
    prompts = []
    monkeypatch.setattr(lm.engine, "generate", lambda taken, params: prompts.extend(taken) or [None] * len(taken))
    monkeypatch.setattr(lm, "_reply_text", lambda completion, sampling: "")
    context = "import os\nimport sys\n" * 4
    assert len(lm.tok_encode(context)) > 20
    # max_gen_toks 0 was refused as "generation kwarg 'max_new_tokens' has value 0", a name the request never gave
    for refused in (24, 20, 256, 0):
        kwargs = {} if refused == 256 else {"max_gen_toks": refused}  # 256: the model arg's default
        said = f"generate_until request 2 of 2: max_gen_toks={refused} must be at least 1 and less than max_length=20"
        with pytest.raises(ValueError, match=said):
            lm.generate_until(requests("generate_until", [(context, {"max_gen_toks": 4}), (context, kwargs)]))
    lm.generate_until(requests("generate_until", [(context, {"max_gen_toks": 19})]))
    assert prompts == [lm.tok_encode(context)[-1:]]  # left-truncated to max_length - max_gen_toks tokens


def test_dtype_auto_is_the_checkpoints_dtype_and_a_name_that_is_no_float_dtype_is_refused(checkpoint, tmp_path):
    stated_bf16 = shutil.copytree(checkpoint, tmp_path / "model")
    config = json.loads((stated_bf16 / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (stated_bf16 / "config.json").write_text(json.dumps(config))
    for directory, expected in ((checkpoint, torch.float32), (stated_bf16, torch.bfloat16)):
        assert next(SeekstackLM(pretrained=directory, dtype="auto").model.parameters()).dtype == expected
    assert next(SeekstackLM(pretrained=checkpoint, dtype="float16").model.parameters()).dtype == torch.float16
    # a name in torch, as transformers (and lm_eval's HF backend) reads it: torch.float is float32
    assert next(SeekstackLM(pretrained=checkpoint, dtype="float").model.parameters()).dtype == torch.float32
    for wrong in ("nn", "int8", "bool"):
        with pytest.raises(ValueError, match=rf"dtype='{wrong}': .* float dtype or its name in torch .*, or auto"):
            SeekstackLM(pretrained=checkpoint, dtype=wrong)


def test_hf_model_args_trust_remote_code_is_taken_and_one_the_backend_lacks_is_named(checkpoint):
    """`--model_args pretrained=X,trust_remote_code=True`, as DeepSeek models are run on the HF backend, failed with
    'TypeError: SeekstackLM.__init__() got an unexpected keyword argument'."""
    from lm_eval.api.registry import get_model

    lm = get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},trust_remote_code=True,max_length=64")
    assert lm.max_length == 64
    refusal = "model args 'logits_cache', 'revision': not taken by the seekstack backend; it takes pretrained, "
    with pytest.raises(ValueError, match=refusal + "tokenizer, batch_size, .*prefix_token_id, trust_remote_code$"):
        get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},revision=main,logits_cache=False")


def test_a_model_arg_lm_eval_hands_on_as_text_is_refused_naming_it(checkpoint):
    """`--model_args` values lm_eval reads as no number nor bool reach the backend as text: max_length=4k and
    prefix_token_id=bos ended in a bare "TypeError: '<' not supported between instances of 'str' and 'int'",
    max_batch_size=x and max_gen_toks=abc were kept for the first request to fail on, and add_bos_token=no framed
    every context with BOS (a text is true). Each is refused, naming the model arg."""
    from lm_eval.api.registry import get_model

    for arg in ("max_length=4k", "prefix_token_id=bos", "max_batch_size=x", "max_gen_toks=abc", "max_length=2.5"):
        name, value = arg.split("=")
        shown = repr(float(value)) if value == "2.5" else repr(value)
        with pytest.raises(ValueError, match=rf"^model arg {name}={shown}: give a whole number$"):
            get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},{arg}")
    with pytest.raises(ValueError, match=r"^model arg add_bos_token='no' must be True or False$"):
        get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},add_bos_token=no")
    lm = get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},add_bos_token=false,max_gen_toks=8")
    assert (lm.add_bos_token, lm.max_gen_toks) == (False, 8)


def test_a_count_model_arg_below_its_least_is_refused_naming_it_before_the_weights_load(checkpoint, monkeypatch):
    """max_batch_size=-1 loaded the model and was refused only when the engine was built, max_batch_size=0 meant
    auto (lm_eval's HF backend finds no batch size from 0), and max_gen_toks=0 was refused at the first request
    taking it."""
    from lm_eval.api.registry import get_model

    def loading(*_args, **_kwargs):
        raise AssertionError("the weights loaded before the model arg was refused")

    monkeypatch.setattr("seekstack.eval.harness.load_pretrained", loading)
    for arg in ("max_batch_size=0", "max_batch_size=-1", "max_gen_toks=0"):
        with pytest.raises(ValueError, match=rf"^model arg {arg}: give at least 1, or leave it out$"):
            get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},{arg}")


def test_a_prefix_token_id_of_no_token_is_refused_before_the_weights_load(checkpoint, monkeypatch):
    """prefix_token_id=-1 was refused only once the weights had loaded, though the tokenizer it is checked against
    loads first."""

    def loading(*_args, **_kwargs):
        raise AssertionError("the weights loaded before prefix_token_id was refused")

    monkeypatch.setattr("seekstack.eval.harness.load_pretrained", loading)
    with pytest.raises(ValueError, match=r"^prefix_token_id=-1 is no token id of the tokenizer \(0 to "):
        SeekstackLM(pretrained=checkpoint, prefix_token_id=-1)


def test_prefix_token_id_conditions_an_empty_context_as_lm_evals_hf_backend_does(checkpoint):
    """`--model_args ...,prefix_token_id=N` (the HF backend's) was refused as a model arg the seekstack backend does
    not take."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    eos = SeekstackLM(pretrained=checkpoint, max_gen_toks=32).eot_token_id
    ours = get_model("seekstack").create_from_arg_string(f"pretrained={checkpoint},prefix_token_id={eos},batch_size=2")
    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32", prefix_token_id=eos)
    assert ours.prefix_token_id == theirs.prefix_token_id == eos
    pairs = requests("loglikelihood", [("", "class Point:\n    pass\n")])
    rolling = requests("loglikelihood_rolling", [(TEXTS[0],)])
    [(our_logprob, _)], [(their_logprob, _)] = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    assert our_logprob == pytest.approx(their_logprob, abs=ATOL)
    assert our_logprob != pytest.approx(SeekstackLM(pretrained=checkpoint).loglikelihood(pairs)[0][0], abs=ATOL)
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=ATOL)
    with pytest.raises(ValueError, match="prefix_token_id=100000 is no token id of the tokenizer"):
        SeekstackLM(pretrained=checkpoint, prefix_token_id=100000)


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_add_bos_token_frames_contexts_as_lm_evals_hf_backend_does_on_a_release(tmp_path_factory, add_bos_token):
    """`--model_args pretrained=X,add_bos_token=True` (the HF backend's arg, common in lm_eval command lines) was
    refused as a model arg the seekstack backend does not take."""
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from tests.interop.release import deepseek_v3_release

    release = deepseek_v3_release(tmp_path_factory.mktemp("release"))
    args = f"pretrained={release},add_bos_token={add_bos_token},batch_size=2,dtype=float32"
    ours = get_model("seekstack").create_from_arg_string(args + ",max_gen_toks=32")
    theirs = HFLM(pretrained=str(release), device="cpu", batch_size=2, dtype="float32", add_bos_token=add_bos_token)
    framed = ours.tok_encode(TEXTS[0])
    assert framed == theirs.tok_encode(TEXTS[0]) and (framed[0] == ours.prefix_token_id) is add_bos_token
    pairs = requests("loglikelihood", PAIRS[:2])
    for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(
        ours.loglikelihood(pairs), theirs.loglikelihood(pairs), strict=True
    ):
        assert our_logprob == pytest.approx(their_logprob, abs=ATOL) and our_greedy == their_greedy
    rolling = requests("loglikelihood_rolling", [(text,) for text in TEXTS])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=ATOL)


def test_a_negative_max_length_is_refused_naming_it_and_0_means_the_models_context(checkpoint):
    with pytest.raises(ValueError, match="max_length=-3: the tokens the model reads at once cannot be negative"):
        SeekstackLM(pretrained=checkpoint, max_length=-3)
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    assert SeekstackLM(pretrained=checkpoint, max_length=0).max_length == context


def test_a_max_length_past_the_models_context_is_refused_naming_both(checkpoint):
    """It was taken: log-likelihoods scored positions the model never trained, and the first generate_until request
    longer than the context failed in the engine ("prompt has 112 tokens, more than max_model_len=64")."""
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"max_length={context + 1} is longer than the model's context, "
                       rf"max_position_embeddings={context} in .*config.json: .*give at most {context}"):  # fmt: skip
        SeekstackLM(pretrained=checkpoint, max_length=context + 1)
    assert SeekstackLM(pretrained=checkpoint, max_length=context).max_length == context


def test_a_runs_out_dir_as_pretrained_loads_its_newest_checkpoint_as_seekstack_eval_does(checkpoint, ours, tmp_path):
    """`lm_eval --model seekstack --model_args pretrained=RUN` failed to load the run's folder (no config.json)."""
    for step in (1, 2):
        shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / f"step_{step}")
        (tmp_path / "run" / "checkpoints" / f"step_{step}" / "train_state.pt").write_bytes(b"")
    lm = SeekstackLM(pretrained=tmp_path / "run", batch_size=2, max_gen_toks=32)
    assert lm.pretrained == str(tmp_path / "run" / "checkpoints" / "step_2")
    pair = [PAIRS[0]]
    assert lm.loglikelihood(requests("loglikelihood", pair)) == ours.loglikelihood(requests("loglikelihood", pair))
