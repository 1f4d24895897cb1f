"""Sampling: filters, penalties, seeded draws, the speculative acceptance rule, streamed text and stop strings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from seekstack.infer.detokenize import TextStream
from seekstack.infer.sampling import (
    BadWords,
    PenaltyState,
    SamplingBatch,
    SamplingParams,
    SeededUniforms,
    token_logprobs,
)
from seekstack.infer.speculative import accept_drafts
from seekstack.schema import ConfigError
from seekstack.tokenizer import BOS, EOS, Tokenizer


def batch_of(*params: SamplingParams, penalties=None) -> SamplingBatch:
    """A batch whose row i draws numbers seeded by its `seed` (or by 1000 + i)."""
    generators = [SeededUniforms(1000 + i if p.seed is None else p.seed) for i, p in enumerate(params)]
    return SamplingBatch(list(params), generators, penalties or [None] * len(params), torch.device("cpu"))


def test_params_from_a_mapping_refuse_unknown_keys_and_bad_values():
    assert SamplingParams.from_dict({"temperature": 0, "stop": ["\n"]}).stop == ("\n",)
    assert SamplingParams.from_dict({"stop": "\n"}).stop == ("\n",) == SamplingParams(stop="\n").stop  # as vLLM's
    with pytest.raises(
        ValueError, match="'temprature'; did you mean 'temperature'\\? known fields are max_new_tokens, temperature"
    ):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError, match="field 'min_p' has value 2: input should be less than or equal to 1"):
        SamplingParams.from_dict({"min_p": 2})
    with pytest.raises(ValueError, match="field 'logprobs' has value 1.5: input should be a valid boolean"):
        SamplingParams.from_dict({"logprobs": 1.5})
    with pytest.raises(ValueError, match=r"field 'stop.0' has value '': string should have at least 1 character"):
        SamplingParams(stop=("",)).validate()
    with pytest.raises(ValueError, match="field 'seed' has value 18446744073709551616"):
        SamplingParams(seed=2**64).validate()
    with pytest.raises(
        ValueError, match=r"field 'logit_bias' has value \{5: 101\}: input should be less than or equal"
    ):
        SamplingParams(logit_bias={5: 101}).validate()
    with pytest.raises(ValueError, match=r"field 'logit_bias' has value \{-1: 1.0\}: input should be greater than"):
        SamplingParams(logit_bias={-1: 1.0}).validate()


def test_params_out_of_range_are_refused_as_they_are_built_and_by_dataclasses_replace():
    """vLLM's SamplingParams(temperature=-1) raises at once; ours was refused only at generate (validate())."""
    with pytest.raises(ValueError, match="field 'temperature' has value -1: input should be greater than or equal"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="field 'max_new_tokens' has value True: input should be a valid integer"):
        SamplingParams(max_new_tokens=True)
    with pytest.raises(ValueError, match="field 'top_p' has value 0: input should be greater than 0"):
        dataclasses.replace(SamplingParams(temperature=0.5), top_p=0)
    assert SamplingParams(stop=["a"], temperature=1).stop == ["a"]  # a list for a tuple, an int for a float: taken


def test_vllms_max_tokens_sets_max_new_tokens_and_a_bad_one_is_refused_naming_it():
    """vLLM scripts write SamplingParams(max_tokens=64): it was a TypeError (unexpected keyword argument)."""
    params = SamplingParams(max_tokens=16, temperature=0)
    assert params.max_new_tokens == 16 == dataclasses.replace(params, top_k=3).validate().max_new_tokens
    assert "max_tokens" not in [field.name for field in dataclasses.fields(SamplingParams)]  # no second field
    with pytest.raises(ValueError, match=r"^field 'max_tokens' must be an int of at least 1 .*, not '16'$"):
        SamplingParams(max_tokens="16")
    with pytest.raises(ValueError, match=r"^field 'max_tokens' must be left out with max_new_tokens=32"):
        SamplingParams(max_tokens=16, max_new_tokens=32)


def test_vllms_max_tokens_reads_and_sets_max_new_tokens_and_dataclasses_replace_still_works():
    """vLLM's params.max_tokens is the int it stops at, and assigning it changes that; here reading gave the InitVar's
    default (NOT_GIVEN) and `params.max_tokens = 5` set an attribute nothing read: 128 tokens all the same."""
    params = SamplingParams()
    assert params.max_tokens == 128 and SamplingParams(max_tokens=None).max_tokens is None
    params.max_tokens = 5
    assert params.max_new_tokens == 5 == params.validate().max_tokens
    with pytest.raises(ValueError, match=r"^field 'max_tokens' must be an int of at least 1 .*, not 0$"):
        params.max_tokens = 0
    assert params.max_new_tokens == 5  # a refused value leaves it as it was
    assert dataclasses.replace(params, max_new_tokens=7).max_tokens == 7
    assert dataclasses.replace(SamplingParams(max_tokens=16), top_k=3).max_tokens == 16


def test_dataclasses_replace_takes_vllms_max_tokens_over_the_length_it_copies():
    """dataclasses.replace(params, max_tokens=5) passes every field, the old max_new_tokens too, so it was refused
    ("field 'max_tokens' must be left out with max_new_tokens=10") for any params not at the default 128."""
    params = SamplingParams(max_tokens=10, temperature=0.5, stop="a")
    shorter = dataclasses.replace(params, max_tokens=5)
    assert (shorter.max_tokens, shorter.temperature, shorter.stop) == (5, 0.5, ("a",))
    assert dataclasses.replace(params, max_tokens=None).max_new_tokens is None
    assert dataclasses.replace(SamplingParams(max_tokens=None), max_tokens=3).max_new_tokens == 3
    with pytest.raises(ValueError, match=r"^field 'max_tokens' must be left out with max_new_tokens=10"):
        SamplingParams(max_tokens=5, max_new_tokens=10)  # both given by the caller: still refused


def test_clone_is_a_copy_whose_changes_leave_the_original_as_vllms():
    """vLLM scripts derive a request's parameters with sp.clone() then set fields; here clone raised AttributeError."""
    params = SamplingParams(max_tokens=10, stop=["a"], logit_bias={3: 1.0}, temperature=0.5)
    copied = params.clone()
    copied.max_tokens = 5
    copied.stop.append("b")
    copied.logit_bias[4] = -1.0
    assert copied == SamplingParams(max_tokens=5, stop=["a", "b"], logit_bias={3: 1.0, 4: -1.0}, temperature=0.5)
    assert params == SamplingParams(max_tokens=10, stop=["a"], logit_bias={3: 1.0}, temperature=0.5)


def max_tokens_set(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """`params` after vLLM's `params.max_tokens = max_tokens`."""
    params.max_tokens = max_tokens
    return params


@pytest.mark.parametrize(
    "shorter",
    [
        lambda: SamplingParams(max_tokens=2, min_tokens=3),
        lambda: SamplingParams.from_dict({"max_tokens": 2, "min_tokens": 3}),
        lambda: dataclasses.replace(SamplingParams(min_tokens=3), max_tokens=2),
    ],
    ids=["constructor", "from_dict", "replace"],
)
def test_min_tokens_above_vllms_max_tokens_is_refused_naming_max_tokens(shorter):
    """A min_tokens above the length was refused as "at most max_new_tokens (2)" where the caller wrote max_tokens=2,
    a name vLLM's users never gave; the length is named as given (both names where validate() cannot tell which)."""
    with pytest.raises(ValueError, match=r"^field 'min_tokens' must be at most max_tokens \(2\), as vLLM's"):
        shorter().validate()
    with pytest.raises(ValueError, match=r"^field 'min_tokens' must be at most max_new_tokens/max_tokens \(2\), as"):
        SamplingParams(max_new_tokens=2, min_tokens=3).validate()


def test_max_tokens_and_min_tokens_set_in_either_order_are_checked_at_use_as_vllms():
    """`params.max_tokens = 5` checked the min_tokens already set, so lowering both (max_tokens first) was refused
    ("must be at most max_tokens (5)") though the pair ends valid; vLLM checks at construction and use, not each set."""
    params = max_tokens_set(SamplingParams(min_tokens=10), 5)
    params.min_tokens = 3
    assert (params.validate().max_tokens, params.validate().min_tokens) == (5, 3)
    params.min_tokens = 7  # left so: refused when used, naming both names of the length
    with pytest.raises(ValueError, match=r"^field 'min_tokens' must be at most max_new_tokens/max_tokens \(5\), as"):
        params.validate()


def test_none_for_the_fields_vllm_defaults_to_none_reads_as_their_defaults():
    """vLLM's SamplingParams(stop=None, logprobs=None, ...) are its defaults; here they were ConfigErrors ("field 'stop'
    has value None: input should be a valid array"), so code passing an optional value through failed."""
    given_none = SamplingParams(stop=None, stop_token_ids=None, logit_bias=None, logprobs=None, temperature=0)
    assert given_none.validate() == SamplingParams(temperature=0).validate()
    assert dataclasses.replace(SamplingParams(stop=["a"]), stop=None).stop == ()


@pytest.mark.parametrize(
    "values",
    [
        {"max_tokens": 16, "temperature": 0},
        {"logprobs": 3, "stop": None, "stop_token_ids": None, "logit_bias": None},
        {"max_tokens": None, "stop": "a"},
    ],
    ids=["max_tokens", "logprobs-k-and-nones", "max_tokens-none"],
)
def test_params_from_a_mapping_read_vllms_forms_as_the_constructor_reads_them(values):
    """SamplingParams(max_tokens=16), (logprobs=3) and (stop=None) are vLLM's forms, which the constructor reads;
    from_dict refused each ("unknown field 'max_tokens'; did you mean 'max_new_tokens'?", "field 'logprobs' has value
    3: input should be a valid boolean", "field 'stop' has value None"), so a vLLM sampling dict failed."""
    assert SamplingParams.from_dict(values) == SamplingParams(**values)
    with pytest.raises(ValueError, match=r"^field 'max_tokens' must be left out with max_new_tokens=32"):
        SamplingParams.from_dict({"max_tokens": 16, "max_new_tokens": 32})
    with pytest.raises(ValueError, match=r"^field 'logprobs' must be True, False or, as vLLM's, how many top"):
        SamplingParams.from_dict({"logprobs": 21})


def test_top_k_minus_one_is_off_as_in_vllm_and_below_it_is_refused_naming_top_k():
    assert SamplingParams(top_k=-1).validate().top_k == 0  # vLLM's SamplingParams(top_k=-1): every token
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.1]])
    torch.testing.assert_close(batch_of(SamplingParams(top_k=-1).validate()).probabilities(logits), logits.softmax(-1))
    with pytest.raises(ValueError, match="field 'top_k' has value -2: input should be greater than or equal to -1"):
        SamplingParams(top_k=-2).validate()


def test_top_k_top_p_and_min_p_keep_exactly_the_expected_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])
    logits = probs.log()
    cases = [
        (SamplingParams(top_k=2), [0, 1]),
        (SamplingParams(top_p=0.7), [0, 1]),  # 0.5 < 0.7, 0.75 >= 0.7: the nucleus is the first two
        (SamplingParams(top_p=0.76), [0, 1, 2]),
        (SamplingParams(min_p=0.2), [0, 1, 2]),  # keep p >= 0.2 * 0.5
        (SamplingParams(top_k=4, min_p=0.1), [0, 1, 2, 3]),
        # top-p measured within the top k, as transformers' and vLLM's: the two kept are 0.667 / 0.333
        (SamplingParams(top_k=2, top_p=0.6), [0]),
        (SamplingParams(top_k=3, top_p=0.6), [0, 1]),  # 0.556 < 0.6 of the three kept
    ]
    for params, kept in cases:
        out = batch_of(params).probabilities(logits)[0]
        assert (out > 0).nonzero().flatten().tolist() == kept, params
        torch.testing.assert_close(out[kept], probs[0, kept] / probs[0, kept].sum())


@pytest.mark.parametrize(
    "params, warper, expected",
    [
        (SamplingParams(top_p=0.75), TopPLogitsWarper(0.75), [0, 1]),
        (SamplingParams(min_p=0.25), MinPLogitsWarper(0.25), [0, 1, 2]),
        (SamplingParams(top_k=4), TopKLogitsWarper(4), [0, 1, 2, 3, 4]),
    ],
    ids=["top-p", "min-p", "top-k"],
)
def test_a_nucleus_min_p_or_top_k_threshold_met_exactly_keeps_what_transformers_keeps(params, warper, expected):
    """Probabilities exact in float32: the first two make 0.75 exactly (the nucleus ends there), 0.125 is exactly
    min_p 0.25 of the largest (kept), and the last two tie for the 4th place (both kept, as vLLM keeps them too)."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]).log()
    kept = torch.isfinite(warper(None, logits.clone()))[0].nonzero().flatten().tolist()
    assert kept == expected
    assert (batch_of(params).probabilities(logits)[0] > 0).nonzero().flatten().tolist() == kept


def test_temperature_scales_logits_and_zero_means_argmax():
    logits = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    out = batch_of(SamplingParams(temperature=0.5), SamplingParams(temperature=0)).probabilities(logits)
    torch.testing.assert_close(out[0], (logits[0] / 0.5).softmax(-1))
    assert out[1].tolist() == [0.0, 1.0, 0.0]


def test_a_vanishing_temperature_or_nucleus_decodes_greedily_instead_of_overflowing():
    logits = torch.randn(2, 50) * 10
    for params in (SamplingParams(temperature=1e-45), SamplingParams(top_p=1e-300), SamplingParams(top_p=1e-46)):
        assert batch_of(params, params).sample(logits).tolist() == logits.argmax(-1).tolist(), params


def test_tied_top_logprobs_are_listed_by_id_so_the_greedy_token_comes_first():
    logits = torch.full((2, 400), -5.0)
    logits[0, [290, 316, 7]] = torch.tensor([2.0, 2.0, 1.0])  # bfloat16 logits tie: 290 and 316
    logits[1, [12, 9]] = 3.0
    greedy = logits.argmax(dim=-1)
    _, _, values, ids = token_logprobs(logits, greedy, top_n=3)
    assert greedy.tolist() == [290, 9] and ids[:, 0].tolist() == [290, 9]
    assert ids[0].tolist() == [290, 316, 7] and values[0, 0] == values[0, 1] > values[0, 2]


class OpsSeen(TorchDispatchMode):
    """Records each aten op run inside it with the shape of its first tensor argument."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
        self.ops.append((func.overloadpacket.__name__, shape))
        return func(*args, **(kwargs or {}))


def test_top_logprobs_are_those_a_stable_sort_lists_first_without_sorting_the_vocabulary():
    """Ties (as bfloat16 logits have) listed by id as a stable sort lists them; the vocabulary itself is never
    sorted, a decode step's cost with top_logprobs (129280 ids: ~50 ms a row on a CPU core, 20-60x a topk)."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 4096, generator=generator) * 3).round()  # ties within the top 5 and across its end
    tokens = logits.argmax(dim=-1)
    expected_values, expected_ids = logits.log_softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
    with OpsSeen() as seen:
        _, _, values, ids = token_logprobs(logits, tokens, top_n=5)
    assert torch.equal(ids, expected_ids[:, :5]) and torch.equal(values, expected_values[:, :5])
    assert ids[:, 0].tolist() == tokens.tolist()
    assert ("sort", (4, 4096)) not in seen.ops


def test_top_k_sampling_and_min_p_take_no_sort_of_the_vocabulary():
    """A sort of 129280 ids costs ~50 ms a row on a CPU core, 20-60x a topk: only a top-p needs one."""
    logits = torch.randn(2, 4096, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(top_k=50), SamplingParams(min_p=0.1), SamplingParams(top_k=20, min_p=0.05)):
        with OpsSeen() as seen:
            batch_of(params, params).probabilities(logits)
        assert ("sort", (2, 4096)) not in seen.ops, params
    with OpsSeen() as seen:
        batch_of(SamplingParams(top_p=0.9)).probabilities(logits[:1])
    assert ("sort", (1, 4096)) in seen.ops


def test_a_nucleus_among_the_likeliest_tokens_takes_no_sort_of_the_vocabulary_and_keeps_what_transformers_keeps():
    """A sort of 129280 ids costs ~30 ms a row on a CPU core: a top-p whose nucleus lies among the likeliest 256 (a
    peaked row, as a trained model's) takes a topk; only a flat row's wider nucleus sorts, that row alone. Beside a
    row at top_p 1, which keeps every token."""
    logits = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0)) * torch.tensor([[8.0], [8.0], [1.0]])
    params = [SamplingParams(top_p=0.95), SamplingParams(), SamplingParams(top_p=0.9)]
    with OpsSeen() as seen:
        kept = batch_of(*params).probabilities(logits)
    assert [op for op in seen.ops if op[0] == "sort"] == [("sort", (1, 4096))]
    for row, params_of_row in enumerate(params):
        expected = TopPLogitsWarper(params_of_row.top_p)(None, logits[row : row + 1].clone()).softmax(-1)[0]
        assert torch.equal(kept[row] > 0, expected > 0)
        torch.testing.assert_close(kept[row], expected)
    assert 1 < int((kept[0] > 0).sum()) < 256 and bool((kept[1] > 0).all()) and int((kept[2] > 0).sum()) > 256


def test_rows_without_a_top_k_take_no_topk_of_the_vocabulary_and_sample_as_alone():
    """A topk of all V values costs what a sort does: rows with no top-k (min-p or top-p alone) take none, also
    beside a row with one, and each row keeps what it keeps alone."""
    logits = torch.randn(2, 4096, generator=torch.Generator().manual_seed(0))
    with OpsSeen() as seen:
        batch_of(SamplingParams(min_p=0.1), SamplingParams(min_p=0.05)).probabilities(logits)
    assert not [op for op in seen.ops if op[0] == "topk"]
    mixed = [SamplingParams(top_k=20), SamplingParams(min_p=0.05)]
    together = batch_of(*mixed).probabilities(logits)
    for row, params in enumerate(mixed):
        assert torch.allclose(together[row], batch_of(params).probabilities(logits[row : row + 1])[0])
    assert int((together[0] > 0).sum()) == 20 and int((together[1] > 0).sum()) > 20


def test_a_row_without_a_top_p_keeps_every_token_beside_a_row_with_one():
    """float32's running sum of a peaked distribution reaches 1 before its tail: the nucleus of a row with top_p 1
    (off) was cut there, by dozens of tokens, whenever another row of the batch asked for a top-p."""
    logits = torch.randn(1, 4096, generator=torch.Generator().manual_seed(1)) * 3
    alone = batch_of(SamplingParams()).probabilities(logits)[0]
    beside = batch_of(SamplingParams(), SamplingParams(top_p=0.5)).probabilities(logits.expand(2, -1))[0]
    assert bool((alone > 0).all()) and torch.equal(beside, alone)


def test_logits_holding_an_infinity_leave_no_distribution_and_sampling_says_so():
    """softmax of +inf is NaN: the draw's search then gave the last id, a speculative step's too; a greedy row still
    takes its argmax, the infinite logit, but one holding a NaN has none (torch's argmax took the NaN's id)."""
    logits = torch.tensor([[0.5, float("inf"), -1.0, 0.2], [0.5, 1.0, -1.0, 0.2]])
    with pytest.raises(ValueError, match="the logits hold an infinity or NaN.*float16"):
        batch_of(SamplingParams(), SamplingParams()).sample(logits)
    with pytest.raises(ValueError, match="the logits hold an infinity or NaN"):
        accept_drafts(batch_of(SamplingParams()), logits[:1, None].expand(1, 2, 4), torch.tensor([[1]]))
    assert batch_of(SamplingParams(temperature=0), SamplingParams()).sample(logits)[0] == 1
    nan = torch.tensor([[0.5, float("nan"), -1.0, 0.2], [float("nan")] * 4])  # argmax: ids 1 and 0, silently
    for row in nan:
        for params in ([SamplingParams(temperature=0)], [SamplingParams(temperature=0), SamplingParams()]):
            with pytest.raises(ValueError, match="the logits hold an infinity or NaN"):
                batch_of(*params).sample(torch.stack([row, logits[1]])[: len(params)])


def test_penalties_follow_hf_repetition_and_openai_presence_frequency_semantics():
    state = PenaltyState.from_prompt([0], vocab_size=4, device=torch.device("cpu"))
    for token in (1, 1, 2):
        state.add(token)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    logits = torch.tensor([[2.0, -2.0, 4.0, 1.0]])
    out = batch_of(params, penalties=[state]).penalize(logits)[0]
    # token 0: prompt only -> 2/2; token 1: twice -> -2*2 - 0.5 - 0.5; token 2: once -> 4/2 - 0.5 - 0.25; 3 untouched
    assert out.tolist() == pytest.approx([1.0, -5.0, 1.25, 1.0])


def test_a_penalty_no_row_sets_takes_no_pass_over_the_vocabulary():
    """Each penalty costs passes over B x V values (torch.where's ~40x a multiplication's on a CPU): a repetition
    penalty alone takes no presence/frequency arithmetic, an OpenAI client's frequency penalty alone no torch.where;
    each gives what it gives beside the others."""
    state = PenaltyState.from_prompt([0], vocab_size=4096, device=torch.device("cpu"))
    for token in (1, 1, 2):
        state.add(token)
    logits = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    for params, untouched_op, changed in (
        (SamplingParams(repetition_penalty=2.0), "sub", [0, 1, 2]),
        (SamplingParams(frequency_penalty=0.25), "where", [1, 2]),
    ):
        with OpsSeen() as seen:
            out = batch_of(params, penalties=[state]).penalize(logits)
        assert (untouched_op, (1, 4096)) not in seen.ops, params
        assert (out != logits).nonzero()[:, 1].tolist() == changed
        both = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25)
        assert torch.equal(batch_of(params, both, penalties=[state, state]).penalize(logits.expand(2, -1))[0], out[0])


def test_logit_bias_is_added_to_its_rows_logits_greedy_or_sampled():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    banned = SamplingParams(temperature=0, logit_bias={1: -100.0})  # the argmax banned: the runner-up
    forced = SamplingParams(temperature=1.5, logit_bias={0: 100.0})  # the least likely token all but certain
    sampling = batch_of(banned, forced, SamplingParams(temperature=0))
    torch.testing.assert_close(sampling.bias(logits), logits + torch.tensor([[0, -100, 0, 0], [100, 0, 0, 0], [0] * 4]))
    for _ in range(20):
        assert sampling.sample(logits).tolist() == [3, 0, 1]
    unbiased = batch_of(SamplingParams(temperature=0))
    assert unbiased.raw_argmax and unbiased.bias(logits) is logits  # nothing made for requests without a bias


def test_speculative_verification_judges_drafts_under_the_logit_bias():
    """Greedy, token 2 banned: the draft 2 (the raw argmax) is rejected for token 3, the next draft accepted."""
    logits = torch.tensor([[[0.0, 0.0, 2.0, 1.0], [0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    sampling = batch_of(SamplingParams(temperature=0, logit_bias={2: -100.0}))
    assert not sampling.raw_argmax
    accepted, tokens, _ = accept_drafts(sampling, logits, torch.tensor([[2, 1]]))
    assert accepted.item() == 0 and tokens[0, 0].item() == 3
    accepted, tokens, _ = accept_drafts(sampling, logits, torch.tensor([[3, 1]]))
    assert accepted.item() == 2 and tokens[0].tolist() == [3, 1, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_later_speculative_column_leaving_no_allowed_id_is_never_kept_and_refused_where_the_next_step_starts(
    temperature,
):
    """bad_words bans tokens 1 and 2 after a 1, allowed_token_ids are [1, 2]: after the draft 1, no token can be
    sampled. Only column 0 was checked: greedy or sampled, the step ended with the generic NO_DISTRIBUTION (a 500 over
    HTTP), even where the row rejected the draft (the column never reached). An accepted draft before that column
    is kept without it (the request may end there, as plain decoding's would), and the next step, starting at it,
    refuses the row with the ConfigError column 0 gets; an unreached one leaves the step as it is."""
    rejecting = torch.tensor([[[0.0, 0.0, 50.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    accepting = torch.tensor([[[0.0, 50.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])

    def sampling(constraint: BadWords) -> SamplingBatch:
        params = SamplingParams(temperature=temperature, allowed_token_ids=[1, 2], seed=7)
        return SamplingBatch([params], [SeededUniforms(7)], [None], torch.device("cpu"), [constraint])

    accepted, tokens, kept = accept_drafts(sampling(BadWords([[1, 1], [1, 2]])), rejecting, torch.tensor([[1, 2]]))
    assert (accepted.tolist(), kept.tolist(), tokens[0, 0].item()) == ([0], [1], 2)
    constraint = BadWords([[1, 1], [1, 2]])
    accepted, tokens, kept = accept_drafts(sampling(constraint), accepting, torch.tensor([[1, 2]]))
    # the draft 1 accepted and kept, the column after it not (it was counted as rejected, though kept)
    assert (accepted.tolist(), kept.tolist(), tokens[0, 0].item()) == ([1], [1], 1)
    constraint.accept(1)
    with pytest.raises(ConfigError) as refused:
        accept_drafts(sampling(constraint), accepting[:, 1:], torch.tensor([[2]]))
    assert str(refused.value) == (
        "field 'allowed_token_ids' [1, 2] are each forbidden here by bad_words, after the tokens before it: no token "
        "could be sampled; allow an id it permits there"
    )


def test_a_seeded_row_draws_the_same_tokens_alone_or_beside_another_row():
    probs = torch.full((2, 1000), 1 / 1000)
    seeded = SamplingParams(seed=7)
    alone, beside = batch_of(seeded), batch_of(SamplingParams(), seeded)
    draws_alone = [alone.draw(probs[:1])[0].item() for _ in range(5)]
    draws_beside = [beside.draw(probs)[1].item() for _ in range(5)]
    assert draws_alone == draws_beside
    assert draws_alone != [batch_of(SamplingParams(seed=8)).draw(probs[:1])[0].item() for _ in range(5)]


def test_seeded_uniforms_are_splitmix64_outputs_and_rewind_with_their_state():
    numbers = SeededUniforms(0)
    # SplitMix64 from state 0 (Vigna's splitmix64.c) outputs 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, ...: top 24 bits
    assert [numbers.next(), numbers.next()] == [0xE220A8 / 2**24, 0x6E789E / 2**24]
    numbers.set_state(1)
    assert numbers.next() == 0x6E789E / 2**24
    assert SeededUniforms(-1).seed == SeededUniforms(2**64 - 1).seed  # a negative seed is its two's complement
    draws = torch.tensor([SeededUniforms(seed).next() for seed in range(20_000)])
    assert 0 <= draws.min() and draws.max() < 1
    deciles = torch.bincount((draws * 10).long(), minlength=10) / len(draws)
    torch.testing.assert_close(deciles, torch.full((10,), 0.1), atol=0.01, rtol=0)  # adjacent seeds, independent


def test_speculative_rule_with_a_one_hot_draft_samples_the_target_distribution():
    target = torch.tensor([0.1, 0.5, 0.3, 0.1])
    rows = 20_000
    sampling = batch_of(*[SamplingParams()] * rows)
    drafts = torch.full((rows, 1), 2)  # the draft model always guesses token 2
    accepted, tokens, _ = accept_drafts(sampling, target.log().expand(rows, 2, -1), drafts)
    frequencies = torch.bincount(tokens[:, 0], minlength=4) / rows
    assert accepted.float().mean().item() == pytest.approx(0.3, abs=0.015)  # p(draft)
    torch.testing.assert_close(frequencies, target, atol=0.015, rtol=0)
    assert not (tokens[accepted == 0, 0] == 2).any()  # a rejected draft is never the token drawn instead


def test_a_seeded_rows_speculative_tokens_are_its_plain_draws_one_number_a_token_kept():
    """Draws were two a column (the acceptance test, then the replacement), all columns drawn: a seeded request's
    tokens hung on how many drafts each step made. Now the n-th token takes the row's n-th number, drafted or not."""
    logits = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(0)) * 0.5
    plain, speculative = batch_of(SamplingParams(seed=3)), batch_of(SamplingParams(seed=3))
    expected = [plain.sample(logits[:, t])[0].item() for t in range(4)]
    drafts = torch.tensor([[expected[0], expected[1] + 1, 7]])  # the first draft passes, the second fails
    accepted, tokens, kept = accept_drafts(speculative, logits, drafts)
    assert (accepted.item(), kept.item()) == (1, 2) and tokens[0, :2].tolist() == expected[:2]
    assert speculative.uniforms[0].get_state() == 2  # one number a token kept: the next step draws the third
    assert speculative.sample(logits[:, 2])[0].item() == expected[2]


def test_speculative_rule_over_several_drafts_samples_each_position_from_its_target():
    """Two drafts per row: the first new token follows p0; the second exists only when the first draft was
    accepted and then follows p1; the third, when both were, follows p2 (the bonus column)."""
    targets = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]])
    rows, drafts = 40_000, torch.tensor([2, 0])
    sampling = batch_of(*[SamplingParams()] * rows)
    accepted, tokens, _ = accept_drafts(sampling, targets.log().expand(rows, -1, -1), drafts.expand(rows, -1))
    assert accepted.float().mean().item() == pytest.approx(0.3 + 0.3 * 0.4, abs=0.015)  # p0(2) + p0(2) p1(0)
    for position in range(3):
        reached = accepted >= position  # rows whose new tokens include this position
        frequencies = torch.bincount(tokens[reached, position], minlength=4) / reached.sum()
        torch.testing.assert_close(frequencies, targets[position], atol=0.015, rtol=0)


def test_speculative_penalties_count_the_drafts_before_each_position():
    """Greedy with a repetition penalty: draft 1 repeats draft 0, whose penalty now makes token 3 the argmax; draft 0
    itself is judged without it (counted, it would lose to token 3 too)."""
    logits = torch.tensor([[[0.0, 0.0, 2.0, 1.5], [0.0, 0.0, 2.0, 1.5], [1.0, 0.0, 0.0, 0.0]]])
    penalties = [PenaltyState.from_prompt([0], 4, torch.device("cpu"))]
    sampling = batch_of(SamplingParams(temperature=0, repetition_penalty=2.0), penalties=penalties)
    accepted, tokens, _ = accept_drafts(sampling, logits, torch.tensor([[2, 2]]))
    assert accepted.item() == 1 and tokens[0, :2].tolist() == [2, 3]


def test_greedy_verification_accepts_only_the_argmax():
    logits = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    sampling = batch_of(SamplingParams(temperature=0, logit_bias={0: 0.5}), SamplingParams(temperature=0))
    accepted, tokens, kept = accept_drafts(sampling, logits, torch.tensor([[1], [2]]))
    assert accepted.tolist() == [1, 0] and kept.tolist() == [2, 1]
    assert tokens[1, 0].item() == 1 and [numbers.get_state() for numbers in sampling.uniforms] == [0, 0]


def test_streamed_text_is_always_valid_utf8_for_emoji_and_cjk(tokenizer):
    text = "日本語のテキスト 👩‍👩‍👧‍👦 and 한국어 🇫🇷 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) / 2  # rare characters split into byte tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(token)[0] for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == text


def sentencepiece_like_tokenizer(decoder: decoders.Decoder | None) -> Tokenizer:
    """Words as single tokens with SentencePiece's ▁ for a space, read back by `decoder` (None: the tokenizers library
    joins tokens with spaces)."""
    vocab = {"▁": 0, "▁hello": 1, "▁world": 2, "▁foo": 3, "▁bar": 4}
    backend = BackendTokenizer(models.WordLevel(vocab=vocab, unk_token="▁"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    if decoder is not None:
        backend.decoder = decoder
    backend.add_special_tokens([BOS, EOS])
    return Tokenizer(backend)


@pytest.mark.parametrize(
    ("decoder", "text"),
    [(decoders.Metaspace(), "hello world foo bar hello"), (None, "▁hello ▁world ▁foo ▁bar ▁hello")],
    ids=["metaspace", "none"],
)
def test_streamed_text_is_the_whole_decode_for_a_decoder_that_spells_a_first_token_apart(decoder, text):
    """A decoder that drops a first token's ▁ (or joins tokens with spaces) spells a token alone otherwise than after
    others: the stream lost the space before every token after the second ('hello worldfoo')."""
    tokenizer = sentencepiece_like_tokenizer(decoder)
    ids = tokenizer.encode("hello world foo bar hello")
    stream = TextStream(tokenizer)
    assert "".join(stream.push(token)[0] for token in ids) + stream.flush() == tokenizer.decode(ids) == text


def test_text_that_may_start_a_stop_string_is_held_back_until_decided(tokenizer):
    stream = TextStream(tokenizer, stop=("END", "xyz"))
    shown = []
    for char in "abEN":
        shown.append(stream.push(tokenizer.encode(char)[0])[0])
    assert "".join(shown) == "ab"  # "EN" could be the start of "END"
    assert stream.push(tokenizer.encode("X")[0]) == ("ENX", False)
    for char in "x":
        assert stream.push(tokenizer.encode(char)[0]) == ("", False)
    assert stream.push(tokenizer.encode("y")[0]) == ("", False)
    assert stream.push(tokenizer.encode("z")[0]) == ("", True)


def test_with_include_stop_the_text_ends_with_the_stop_string(tokenizer):
    stream = TextStream(tokenizer, stop=("yz", "END"), include_stop=True)
    shown = [stream.push(tokenizer.encode(char)[0]) for char in "abEND"]
    assert "".join(text for text, _ in shown) == "abEND" and shown[-1][1]


@pytest.mark.parametrize(
    ("text", "after_reasoning", "shown"),
    [
        ("<think> Question: 2 + 3? </think> 5 Question: next", None, "<think> "),
        ("<think> Question: 2 + 3? </think> 5 Question: next", "", "<think> Question: 2 + 3? </think> 5 "),
        ("  <think> Question: </think>Question:", "", "  <think> Question: </think>"),
        ("5 Question: next", "", "5 "),  # no reasoning: the whole reply is the answer
        ("<think> Question: cut before its end", "", "<think> Question: cut before its end"),
        (" Question: 2 + 3? </think> 5 Question: next", "<think> 3", " Question: 2 + 3? </think> 5 "),  # a prefix's
        (" 5 Question: next", "<think> 2 + 3 </think>", " 5 "),
    ],
)
def test_stop_strings_after_reasoning_match_in_the_answer_only(tokenizer, text, after_reasoning, shown):
    """A stop string the reasoning restated (lm-eval's "Question:") ended an R1 reply inside its <think>, as vLLM's V1
    engine does (vllm#52393): no answer. With after_reasoning (the reply's given start, a chat prefix's) they match
    after the first </think>."""
    stream = TextStream(tokenizer, stop=("Question:",), after_reasoning=after_reasoning)
    released, stopped = "", False
    for token in tokenizer.encode(text):
        piece, stopped = stream.push(token)
        released += piece
        if stopped:
            break
    assert (released if stopped else released + stream.flush()) == shown
    assert stopped == (shown != text)


def test_special_tokens_are_left_out_of_the_text_only_when_asked(tokenizer):
    ids = tokenizer.encode("ab<｜User｜>cd<｜Assistant｜>e")
    assert tokenizer.encode("<｜User｜>")[0] in ids  # one special token id, not its characters
    kept, skipped = TextStream(tokenizer), TextStream(tokenizer, skip_special_tokens=True)
    assert "".join(kept.push(token)[0] for token in ids) + kept.flush() == "ab<｜User｜>cd<｜Assistant｜>e"
    assert "".join(skipped.push(token)[0] for token in ids) + skipped.flush() == "abcde"


def test_ids_past_the_tokenizers_in_a_padded_vocabulary_are_refused_naming_the_id_its_position_and_the_tokenizer(
    tokenizer,
):
    """A model's vocabulary padded past the tokenizer's ids (released checkpoints round vocab_size up) took prompt ids
    512..575 of a 512-id tokenizer, which decode to no token (their prompt logprob -inf), where the server refuses
    them: the engine now refuses them by the tokenizer's ids, as the server does (`outside_vocabulary`)."""
    from seekstack import Transformer
    from seekstack.infer import Engine
    from seekstack.infer.sampling import outside_vocabulary
    from tests.conftest import micro_config
    from tests.infer.support import VOCAB

    assert outside_vocabulary([1, 2, 9, 7], 5) == (2, 9) and outside_vocabulary([4, -1], 5) == (1, -1)
    assert outside_vocabulary({9: 1.0}, 5) == (9, 9) and outside_vocabulary([0, 4], 5) is None
    torch.manual_seed(0)
    padded = Engine(Transformer(micro_config(vocab_size=VOCAB + 64)).eval(), tokenizer)
    rows = ": the tokenizer's ids; the model's rows 512 to 575 pad its vocabulary and decode to no token"
    for fields, prompt, message in (
        ({}, [5, 9, VOCAB + 3], f"prompt holds token id 515, outside the vocabulary [0, 512) at position 2{rows}"),
        (dict(stop_token_ids=[VOCAB]), [5], f"stop_token_ids holds token id 512, outside the vocabulary [0, 512) at "
         f"position 0{rows}"),
        (dict(allowed_token_ids=(5, VOCAB + 1)), [5], f"allowed_token_ids holds token id 513, outside the vocabulary "
         f"[0, 512) at position 1{rows}"),
        (dict(logit_bias={VOCAB + 63: 1.0}), [5], f"logit_bias holds token id 575, outside the vocabulary [0, 512)"
         f"{rows}"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as refused:
            padded.generate([prompt], SamplingParams(max_new_tokens=2, **fields))
        assert str(refused.value).endswith(message), str(refused.value)
    assert padded.generate([[5, VOCAB - 1]], SamplingParams(max_new_tokens=2))[0].token_ids  # the tokenizer's last id
    unpadded = Engine(Transformer(micro_config(vocab_size=VOCAB)).eval(), tokenizer)
    with pytest.raises(ValueError) as refused:
        unpadded.generate([[5, VOCAB]], SamplingParams(max_new_tokens=2))
    assert str(refused.value).endswith("prompt holds token id 512, outside the vocabulary [0, 512) at position 1")


@pytest.mark.parametrize(
    "name", ["logits_processors", "structured_outputs", "guided_decoding", "guided_json", "guided_regex",
             "guided_choice", "guided_grammar"],
)  # fmt: skip
def test_vllm_fields_not_taken_are_refused_naming_the_field_and_what_to_use(name):
    """vLLM's logits_processors and structured outputs were a bare "TypeError: SamplingParams.__init__() got an
    unexpected keyword argument", saying neither why nor that JSON mode is there (from_dict: "unknown field"). None,
    vLLM's default for each, asks for nothing and is taken, as bad_words=None is."""
    why = (
        "per-request Python logits processors do not run in the engine's batched (and compiled) step; ban or favour "
        "tokens with logit_bias, allowed_token_ids or bad_words"
        if name == "logits_processors"
        else "hold a request to JSON, or to a JSON Schema, with engine.add_request(ids, params, constraint=JsonFormat("
        "engine.tokenizer, schema).constraint()) (seekstack.infer.json_mode), as serve's response_format does"
    )
    given = {name: {"json": {f"field_{i}": {"type": "string"} for i in range(500)}}}  # a schema of 16 KB
    for build in (lambda: SamplingParams(**given), lambda: SamplingParams.from_dict(given)):
        with pytest.raises(ConfigError) as refused:
            build()
        shown = f"{repr(given[name])[:80]}... (1 item)"  # its start, as the project's field errors show a value
        told = f"has value {shown}: must be None (left out), vLLM's field not taken here: {why}"
        assert str(refused.value) == f"field {name!r} {told}"
    assert SamplingParams(**{name: None}, top_k=3) == SamplingParams(top_k=3)
    assert SamplingParams.from_dict({name: None, "top_k": 3}) == SamplingParams(top_k=3)


@pytest.mark.parametrize(
    "name, default, other, why",
    [
        ("spaces_between_special_tokens", True, False, "True: a text is the tokenizer's decode of its tokens, special "
         "or not, with no other joining of special tokens"),
        ("output_kind", 0, 2, "RequestOutputKind.CUMULATIVE (0) or None: generate and chat return each whole reply, "
         "and stream and step() hand out each request's new tokens, whatever a request asks"),
        ("extra_args", {}, {"plugin": 1}, "None or {}: they feed vLLM's custom sampling plugins and logits "
         "processors, none of which run here"),
    ],
)  # fmt: skip
def test_vllm_fields_at_their_default_are_taken_and_refused_otherwise_naming_the_field(name, default, other, why):
    """vLLM's spaces_between_special_tokens, output_kind and extra_args were a bare "TypeError: SamplingParams.
    __init__() got an unexpected keyword argument" (from_dict: "unknown field"), even at vLLM's default value: that
    default is taken, asking for what the engine does; another value is refused naming the field and why."""
    for build in (SamplingParams, lambda **values: SamplingParams.from_dict(values)):
        assert build(**{name: default}, top_k=3) == SamplingParams(top_k=3)
        with pytest.raises(ConfigError) as refused:
            build(**{name: other})
        assert str(refused.value) == f"field {name!r} has value {other!r}: must be vLLM's default, {why}"


def test_vllms_best_of_is_taken_equal_to_n_and_refused_above_it_saying_how_to_rank_samples():
    """SamplingParams(n=2, best_of=3), vLLM's, raised a bare "TypeError: SamplingParams.__init__() got an unexpected
    keyword argument 'best_of'" (from_dict: "unknown field"), though the server takes best_of; generate returns every
    sample it draws, so more candidates than n are refused saying how to rank them, and best_of=n (what vLLM's None
    means) asks for nothing and is taken."""
    why = (
        "generate returns every sample it draws, none ranked away (the server's best_of ranks them): draw n=best_of "
        "with logprobs=True and keep the n of highest .cumulative_logprob (best_of equal to n is taken)"
    )
    for given in ({"n": 2, "best_of": 3}, {"best_of": 2}):
        for build, values in ((SamplingParams, given), (SamplingParams.from_dict, {"values": given})):
            with pytest.raises(ConfigError) as refused:
                build(**values)
            assert str(refused.value) == (
                f"field 'best_of' has value {given['best_of']}: must be None (left out), vLLM's field not taken here: "
                f"{why}"
            )
    for given in ({"n": 2, "best_of": 2}, {"best_of": 1}, {"n": 3, "best_of": None}):
        n = given.get("n", 1)
        assert SamplingParams(**given) == SamplingParams.from_dict(given) == SamplingParams(n=n)


def test_best_of_below_n_is_refused_saying_it_must_be_at_least_n_as_vllms():
    """SamplingParams(n=3, best_of=2) was refused with best_of's reason for more candidates than n ("... draw
    n=best_of with logprobs=True ..."), advice that asks for fewer samples than the caller wants; vLLM says best_of
    must be at least n, and so does the refusal now, for both ways of building the params."""
    for given in ({"n": 3, "best_of": 2}, {"best_of": 0}):
        n, best_of = given.get("n", 1), given["best_of"]
        for build, values in ((SamplingParams, given), (SamplingParams.from_dict, {"values": given})):
            with pytest.raises(ConfigError) as refused:
                build(**values)
            assert refused.value.field == "best_of"
            assert str(refused.value) == (
                f"field 'best_of' has value {best_of}, below n ({n}): must be at least n, as vLLM's (the n returned "
                "are chosen among best_of samples); leave best_of out or give it n"
            )


def test_bad_words_read_only_the_outputs_last_tokens_and_ban_as_the_whole_output_says():
    """BadWords.allowed_after copied the whole output once per draft column each speculative step (0.7 ms a step at
    10 tokens, 5.2 ms at 100k): it keeps only the last tokens the longest word can end with, three here, and bans
    what comparing each word with the whole output bans."""
    words, vocab = [[7], [3, 4], [1, 2, 3, 4]], 9
    constraint, output = BadWords(words), []
    for token in [*torch.randint(1, 6, (1000,), generator=torch.Generator().manual_seed(0)).tolist(), 1, 2, 3]:
        constraint.accept(token)
        output.append(token)
        drafts = [1, 2, 3]
        masks = constraint.allowed_after(drafts, vocab)
        for column, tokens in enumerate(output + drafts[:t] for t in range(len(drafts) + 1)):
            banned = {last for *prefix, last in words if tokens[len(tokens) - len(prefix) :] == prefix}
            assert masks[column].logical_not().nonzero().flatten().tolist() == sorted(banned)
        assert torch.equal(constraint.allowed(vocab), masks[0])
    banned_now = constraint.allowed(vocab).logical_not().nonzero().flatten().tolist()
    assert (list(constraint.recent), banned_now) == ([1, 2, 3], [4, 7])  # 1 2 3 ends the output: 4 would end a word
