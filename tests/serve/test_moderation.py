"""Content safety: the policy file, spans held back and acted on as text streams, prompts blocked or redacted, a
generation cut with finish_reason "content_filter", the ledger's category and billing, /v1/moderations with a
trained classifier."""

from __future__ import annotations

import functools
import json
import threading
import unicodedata

import pytest
import yaml

from seekstack.corpus.quality import train_quality_model
from seekstack.infer.detokenize import TextStream
from seekstack.infer.engine import Engine
from seekstack.infer.outputs import TokenLogprob
from seekstack.schema import ConfigError
from seekstack.serve import app as app_module
from seekstack.serve import moderation
from seekstack.serve.app import create_app
from seekstack.serve.billing import Bill
from seekstack.serve.database import open_database
from seekstack.serve.errors import APIError, parse_body
from seekstack.serve.keys import KeyStore
from seekstack.serve.launch import warn_of_unknown_scopes
from seekstack.serve.ledger import Ledger
from seekstack.serve.moderation import Category, CategoryRule, HeldLogprobs, ModeratedStream, Policy, redacted, scan
from seekstack.serve.safety import OPENAI_CATEGORIES, ContentSafety, Spelling
from seekstack.serve.schemas import CompletionRequest, ModerationRequest
from seekstack.tokenizer import Tokenizer
from tests.serve.server import error_of, make_model_dir, run, with_openai

UNCHECKED = dict.fromkeys(OPENAI_CATEGORIES, False)  # OpenAI's categories, in every result: those the policy lacks

WEAPONS = ["how do I build a pipe bomb", "instructions for a nerve agent", "make an explosive device at home"] * 5
HARMLESS = ["how do I build a birdhouse", "instructions for a sourdough loaf", "make a kite at home"] * 5


def write_policy(folder, categories: dict, **scopes) -> Policy:
    (folder / "policy.yaml").write_text(yaml.safe_dump({"categories": categories, **scopes}))
    return Policy.load(folder / "policy.yaml")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("moderation"))


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Policy:
    folder = tmp_path_factory.mktemp("policy")
    train_quality_model(WEAPONS, HARMLESS, buckets=2**12).save(folder / "weapons.npz")
    return write_policy(
        folder,
        {
            "weapons": {
                "action": "block",
                "terms": ["pipe bomb"],
                "classifier": "weapons.npz",
                "threshold": 0.7,
                "billing": "none",
            },
            "pii": {"action": "redact", "patterns": [r"[\w.]+@[\w.]+\.com"]},
            "rude": {"action": "flag", "terms": ["stupid"]},
        },
        plans={"research": ["pii"]},
    )


def test_a_policy_file_with_a_mistake_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="invalid pattern"):
        write_policy(tmp_path, {"bad": {"patterns": ["(unclosed"]}})
    with pytest.raises(ConfigError, match="unknown category 'nope'"):
        write_policy(tmp_path, {"pii": {"terms": ["x"]}}, plans={"free": ["nope"]})
    with pytest.raises(ConfigError, match="no classifier file"):
        write_policy(tmp_path, {"pii": {"classifier": "missing.npz"}})
    (tmp_path / "damaged.npz").write_text("not a model")  # was: a ValueError naming the .npz alone
    with pytest.raises(ConfigError, match=r"policy.yaml: category 'pii': .*damaged.npz: not a quality model"):
        write_policy(tmp_path, {"pii": {"classifier": "damaged.npz"}})
    with pytest.raises(ConfigError, match="action"):
        write_policy(tmp_path, {"pii": {"terms": ["x"], "action": "shout"}})
    with pytest.raises(ConfigError, match=r"policy.yaml: unknown field 'categories.pii.treshold'; did you mean "
                       r"'threshold'\? known fields are action, terms, patterns, classifier, threshold"):  # fmt: skip
        write_policy(tmp_path, {"pii": {"terms": ["x"], "treshold": 0.3}})  # was: 'unexpected keyword argument'


def test_a_policy_file_that_could_never_act_is_refused_naming_what(tmp_path):
    with pytest.raises(ConfigError, match=r"policy.yaml: no categories: the policy would moderate nothing"):
        write_policy(tmp_path, {})  # was: loaded, and moderated nothing
    (tmp_path / "policy.yaml").write_text("")
    with pytest.raises(ConfigError, match="no categories"):
        Policy.load(tmp_path / "policy.yaml")
    with pytest.raises(ConfigError, match=r"category 'pii' has a blank term '   ', which matches nothing"):
        write_policy(tmp_path, {"pii": {"terms": ["foo", "   "]}})
    with pytest.raises(ConfigError, match=r"category 'pii' has an empty pattern '', which matches no text"):
        write_policy(tmp_path, {"pii": {"patterns": ["\\d+", ""]}})  # was: loaded without a word
    with pytest.raises(ConfigError, match=r"category 'pii' has a threshold but no classifier, whose probability"):
        write_policy(tmp_path, {"pii": {"terms": ["x"], "threshold": 0.9}})  # was: loaded, the threshold unread
    long_term = "the launch code of the northern base is written on the blue card in the drawer"  # 78 characters
    with pytest.raises(
        ConfigError,
        match=r"category 'codes' has a term of 78 characters, longer than its holdback of "
        r"64: a stream would show the start of 'the launch .* before finding it; set `holdback: 78`",
    ):
        write_policy(tmp_path, {"codes": {"terms": ["code", long_term]}})  # was: its first 14 characters streamed
    assert write_policy(tmp_path, {"codes": {"terms": [long_term], "holdback": 78}}).categories["codes"]
    assert write_policy(tmp_path, {"codes": {"action": "flag", "terms": [long_term], "holdback": 0}}).categories


def test_serving_warns_of_the_plans_and_keys_a_policy_names_that_the_database_lacks(tmp_path, caplog):
    database = open_database(tmp_path / "db")
    store = KeyStore(database)
    store.create("alice")
    policy = write_policy(tmp_path, {"pii": {"terms": ["x"]}}, plans={"default": ["pii"], "fre": ["pii"]},
                          keys={"alice": [], "bob": ["pii"]})  # fmt: skip
    warn_of_unknown_scopes(policy, tmp_path / "policy.yaml", store)
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'policy.yaml'}: plans.fre: no plan 'fre' in the database {database.location} (yet), so this "
        "entry applies to no key",
        f"{tmp_path / 'policy.yaml'}: keys.bob: no key 'bob' in the database {database.location} (yet), so this "
        "entry applies to no key",
    ]  # fmt: skip


def test_a_blocked_term_split_across_pieces_is_never_released(policy):
    stream = ModeratedStream(list(policy.categories.values()))
    shown, hits = "", []
    for piece in ["Now I will build a pi", "pe bo", "mb and more text after it"]:
        text, hit = stream.push(piece)
        shown += text
        hits.append(hit)
        if hit:
            break
    assert "pi" not in shown.removeprefix("Now I will build a ")
    assert shown == "Now I will build a " and hits[-1].category == "weapons" and hits[-1].span is not None


def test_look_alike_spellings_of_a_term_are_found_where_they_stand(policy):
    weapons = policy.categories["weapons"]
    for text in (
        "build a ｐｉｐｅ ｂｏｍｂ now",
        "build a pi\u200bpe bo\u00admb now",
        "build a pıpe bomb now",  # the dotless ı: i to Python's `re`, and to the policy still
        "build a pi\u200epe b\u034fo\u202em\ufe0fb now",  # a direction mark, a grapheme joiner, a variation selector
        "build a pi\U000e0041pe\u2062 bomb now",  # a tag character, an invisible operator: none shows
        "build a Pipe bomb now",
        "build a pipe  bomb now",
        "build a pipe\nbomb now",
        "build a PIPE\t bomb now",
    ):
        (hit,) = weapons.spans(text)
        found = text[hit.span[0] : hit.span[1]].lower()
        assert found.startswith(("ｐ", "pi", "pı")) and text[hit.span[1] :] == " now", text
    rude = policy.categories["rude"]  # a scan from inside a word still sees the word: no match inside it
    assert rude.spans("so unstupid a thing", start=5) == [] and rude.spans("so ｕｎｓｔｕｐｉｄ", start=5) == []
    assert [hit.span for hit in rude.spans("so stupid, ｓｔｕｐｉｄ", start=3)] == [(3, 9), (11, 17)]
    stream = ModeratedStream(list(policy.categories.values()))
    shown, blocking = stream.push("Now build a ｐｉｐｅ ｂｏｍｂ and more", final=True)
    assert "ｐ" not in shown and blocking.category == "weapons"  # (its classifier reads the folded text too)


def test_an_email_split_across_pieces_is_redacted_and_a_flag_passes_through(policy):
    stream = ModeratedStream(list(policy.categories.values()))
    pieces = ["write to jane.d", "oe@example.c", "om, you stupid", " person"]
    shown = "".join(stream.push(piece, final=number == len(pieces))[0] for number, piece in enumerate(pieces, 1))
    assert shown == "write to [REDACTED:pii], you stupid person"
    assert {hit.category for hit in stream.hits} == {"pii", "rude"}


def test_logprobs_go_out_with_their_text_and_never_for_redacted_or_blocked_text(model_dir, policy):
    tokenizer = Tokenizer.from_file(model_dir)
    text = "write to jane.doe@example.com, you stupid person, or build a pipe bomb and more after it"
    engine_text = TextStream(tokenizer)  # what the engine hands out, token by token
    moderated, held = ModeratedStream(list(policy.categories.values())), HeldLogprobs(tokenizer, False)
    released: list[TokenLogprob] = []
    shown = ""
    for token in tokenizer.encode(text):
        piece, _ = engine_text.push(token)
        new_text, blocking = moderated.push(piece)
        shown += new_text
        held.add([TokenLogprob(token, tokenizer.decode([token]), -1.0, [])])
        released += held.release(moderated.released, moderated.redacted_spans)
        assert len("".join(entry.token for entry in released)) <= moderated.released  # never ahead of the text
        if blocking:
            break
    assert shown == "write to [REDACTED:pii], you stupid person, or build a "  # what came before the block
    tokens = "".join(entry.token for entry in released)
    assert tokens.startswith("write to ") and "@" not in tokens and "example" not in tokens  # the email: redacted
    assert ", you stupid person, or build a " in tokens and "pi" not in tokens.split("build a ")[1]  # blocked


def test_a_tokens_logprob_goes_out_with_its_own_text_though_that_came_with_the_next_tokens(model_dir):
    """A byte of a UTF-8 character, whose text ("\ufffd" for a lone one) appears only with the next token's, took
    that token's place: a stop string inside the next token ("\ufffdq" shown of "\ufffdquick") cut both entries,
    the logprobs short of the text. Each token now ends where its bytes reach, a character it holds part of whole."""
    tokenizer = Tokenizer.from_file(model_dir)
    byte = tokenizer.backend.token_to_id("\u00e2")  # the byte-level alphabet's 0xE2, a 3-byte character's lead
    texts = ["qu", "ick"]
    for prefix in ([byte], tokenizer.encode("\u20ac")):  # a lone byte (U+FFFD), then the three bytes of €
        ids = [*prefix, *(tokenizer.backend.token_to_id(text) for text in texts)]
        assert tokenizer.decode(ids) == tokenizer.decode(prefix) + "quick"
        held = HeldLogprobs(tokenizer, False)
        held.add([TokenLogprob(token, tokenizer.decode([token]), -1.0, []) for token in ids], final=True)
        assert [entry.token_id for entry in held.release(2)] == prefix  # the character and "q" shown
        assert [entry.token_id for entry in held.release(6)] == ids[len(prefix) :]


def test_prompts_are_blocked_or_redacted_and_the_ledger_has_the_category(model_dir, policy, tmp_path):
    engine = Engine.from_pretrained(model_dir)
    database = open_database(tmp_path / "db")
    app = create_app(engine, database, policy=policy)
    body = {"model": "model", "max_tokens": 2, "ignore_eos": True, "temperature": 0}  # greedy: the same output

    async def scenario(client):
        blocked = await client.post("/v1/completions", json={**body, "prompt": "how to build a pipe bomb"})
        redacted = await client.post("/v1/completions", json={**body, "prompt": "mail bob@corp.com now"})
        flagged = await client.post("/v1/completions", json={**body, "prompt": "you are stupid"})
        return blocked, redacted, flagged

    blocked, redacted, flagged = run(app, scenario)
    error = error_of(blocked, 400)
    assert (error["code"], error["param"]) == ("content_policy_violation", "prompt") and "weapons" in error["message"]
    expected_tokens = len(engine.tokenizer.encode("mail [REDACTED:pii] now"))
    assert redacted.json()["usage"]["prompt_tokens"] == expected_tokens  # the model read the redacted prompt
    assert flagged.status_code == 200
    rows = Ledger(database).records()
    assert [(row["status"], row["moderation"]) for row in rows] == [(400, "weapons"), (200, "pii"), (200, "rude")]
    assert rows[0]["prompt_tokens"] == 0 and rows[0]["cost"] == 0  # refused: no tokens, whatever its billing
    assert rows[1]["cost"] > 0


def test_token_id_prompts_are_read_as_their_text_blocked_or_redacted_like_it(model_dir, policy, tmp_path):
    engine = Engine.from_pretrained(model_dir)
    database = open_database(tmp_path / "db")
    app = create_app(engine, database, policy=policy)
    encode = engine.tokenizer.encode
    # greedy: sampled at temperature 1, the random model's 2 tokens now and then read as weapons to the classifier
    # ('^\ufffd' scores 0.97), and a block on the output outranks the prompt's redaction in the ledger
    body = {"model": "model", "max_tokens": 2, "ignore_eos": True, "echo": True, "temperature": 0}

    async def scenario(client):
        blocked = await client.post("/v1/completions", json={**body, "prompt": encode("how to build a pipe bomb")})
        redacted = await client.post(
            "/v1/completions", json={**body, "prompt": [encode("hello"), encode("mail bob@corp.com now")]}
        )
        return blocked, redacted

    blocked, redacted = run(app, scenario)
    error = error_of(blocked, 400)  # was: 200, the prompt not read
    assert (error["code"], error["param"]) == ("content_policy_violation", "prompt") and "weapons" in error["message"]
    texts = [choice["text"] for choice in redacted.json()["choices"]]
    assert texts[0].startswith("hello") and texts[1].startswith("mail [REDACTED:pii] now")  # the ids of that text
    assert redacted.json()["usage"]["prompt_tokens"] == len(encode("hello")) + len(encode("mail [REDACTED:pii] now"))
    assert [row["moderation"] for row in Ledger(database).records()] == ["weapons", "pii"]


def test_a_redacted_token_id_prompt_keeps_every_id_outside_the_hit_as_sent(model_dir, policy):
    tokenizer = Tokenizer.from_file(model_dir)
    safety = ContentSafety(policy, tokenizer)
    spelled_apart = [token_id for character in "hello café " for token_id in tokenizer.encode(character)]
    lone_byte = tokenizer.encode("é")[:1]  # half a character: read as U+FFFD, sent on as the byte it is
    before, after = spelled_apart + lone_byte + tokenizer.encode("mail"), tokenizer.encode(" now")
    body = CompletionRequest(model="model", prompt=[*before, *tokenizer.encode(" bob@corp.com"), *after])
    assert safety.moderate_prompt(body, safety.categories_for(None), Bill(None, None, "model", "/v1/completions", 0))
    [redacted_ids] = body.prompt
    assert redacted_ids[: len(before)] == before and redacted_ids[-len(after) :] == after  # was: all re-encoded
    assert redacted_ids[len(before) : -len(after)] == tokenizer.encode(" [REDACTED:pii]")


def test_token_ids_of_a_tokenizer_whose_pieces_are_not_their_text_are_read_as_decoded(tmp_path):
    """A SentencePiece-style tokenizer (Metaspace `▁`, byte fallback): its pieces joined are not its text."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", *(f"<0x{byte:02X}>" for byte in range(256))]
    backend.train_from_iterator(
        ["how to build a bomb today"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    )
    tokenizer = Tokenizer(backend)
    safety = ContentSafety(
        write_policy(tmp_path, {"weapons": {"action": "block", "terms": ["build a bomb"]}}), tokenizer
    )
    body = CompletionRequest(model="model", prompt=tokenizer.encode("how to build a bomb"))
    with pytest.raises(APIError, match="content policy"):  # was: read as '▁how▁to▁build▁a▁bomb', passed
        safety.moderate_prompt(body, safety.categories_for(None), Bill(None, None, "model", "/v1/completions", 0))


def test_a_term_in_the_tools_or_a_replayed_tool_call_is_refused_as_in_a_message(model_dir, tmp_path):
    """The policy read the messages' texts alone: a blocked term in a tool's description or in a replayed call's
    arguments (escaped, as json.dumps writes them) reached the model (200), and so did a redacted pattern. Each is now
    refused naming where; tools a tool_choice "none" leaves out of the prompt are not read."""
    policy = write_policy(tmp_path, {"weapons": {"action": "block", "terms": ["炸弹"]},
                                     "pii": {"action": "redact", "patterns": [r"\d{3}-\d{4}"]}})  # fmt: skip
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"), policy=policy)

    def tool(description: str) -> list[dict]:
        return [{"type": "function", "function": {"name": "f", "description": description,
                                                  "parameters": {"type": "object"}}}]  # fmt: skip

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"q": "炸弹"})}}
    replayed = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]  # fmt: skip
    hi = [{"role": "user", "content": "hi"}]

    async def scenario(client):
        return [await client.post(route, json=body) for route, body in (
            ("/tokenize", {"messages": hi, "tools": tool("怎么制造炸弹")}),
            ("/tokenize", {"messages": hi, "tools": tool("call 555-1234")}),
            ("/v1/chat/completions", {"messages": replayed, "max_tokens": 1}),
            ("/tokenize", {"messages": hi, "tools": tool("怎么制造炸弹"), "tool_choice": "none"}),
        )]  # fmt: skip

    *refused, left_out = run(app, scenario)
    said = [(error_of(response, 400)["param"], error_of(response, 400)["message"]) for response in refused]
    assert said == [
        ("tools", "a tool was refused by this server's content policy (category 'weapons')"),
        ("tools", "a tool was refused by this server's content policy (category 'pii', which redacts text: its fields "
                  "are refused, not redacted)"),
        ("messages", "a replayed tool call was refused by this server's content policy (category 'weapons')"),
    ]  # fmt: skip
    assert {error_of(response, 400)["code"] for response in refused} == {"content_policy_violation"}
    assert left_out.status_code == 200


def test_the_spelling_of_token_ids_is_their_decoded_text(model_dir):
    tokenizer = Tokenizer.from_file(model_dir)
    ids = [tokenizer.bos_id, *tokenizer.encode("naïve 你好"), *tokenizer.encode("你")[:2], *tokenizer.encode("ok")]
    assert Spelling.of(tokenizer, ids).text == tokenizer.decode(ids)


def test_a_blocked_prompt_costs_nothing_even_where_its_category_bills_tokens(model_dir, tmp_path):
    policy = write_policy(tmp_path, {"code": {"action": "block", "terms": ["import"], "billing": "tokens"}})
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("coder")
    app = create_app(Engine.from_pretrained(model_dir), database, policy=policy)
    body = {"model": "model", "prompt": "import os", "max_tokens": 4}

    async def scenario(client):
        return await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    assert error_of(run(app, scenario), 400)["code"] == "content_policy_violation"
    [row] = Ledger(database).records()
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["cost"], row["moderation"]) == (
        400, 0, 0, 0.0, "code",
    )  # fmt: skip


def test_a_stream_crossing_the_line_stops_with_content_filter(model_dir, tmp_path):
    """A policy that blocks any visible character: the stream shows only whitespace, then content_filter."""
    policy = write_policy(tmp_path, {"anything": {"action": "block", "patterns": [r"\S"]}}, keys={"exempt": []})
    database = open_database(tmp_path / "db")
    store = KeyStore(database)
    user, exempt = store.create("user"), store.create("exempt")
    app = create_app(Engine.from_pretrained(model_dir), database, policy=policy)
    body = {"model": "model", "prompt": "  ", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "logprobs": 0}

    async def scenario(client):
        streamed = await client.post("/v1/completions", json={**body, "stream": True},
                                     headers={"Authorization": f"Bearer {user}"})  # fmt: skip
        whole = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {user}"})
        free = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {exempt}"})
        return streamed, whole, free

    streamed, whole, free = run(app, scenario)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert not "".join(chunk["choices"][0]["text"] for chunk in chunks).strip()
    sent = [
        token
        for chunk in chunks
        if chunk["choices"][0]["logprobs"]
        for token in chunk["choices"][0]["logprobs"]["tokens"]
    ]
    assert not "".join(sent).strip()  # no logprobs of the blocked text either
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert whole.json()["choices"][0]["finish_reason"] == "content_filter"
    assert not whole.json()["choices"][0]["text"].strip()
    assert not "".join(whole.json()["choices"][0]["logprobs"]["tokens"]).strip()
    assert free.json()["choices"][0]["finish_reason"] == "length"  # the key's policy names no category
    assert free.json()["choices"][0]["text"].strip()
    rows = Ledger(database).records()
    assert [row["moderation"] for row in rows] == ["anything", "anything", None]
    assert rows[0]["completion_tokens"] < 40 and rows[1]["completion_tokens"] < 40  # both were stopped, not billed
    assert whole.json()["usage"]["completion_tokens"] == rows[1]["completion_tokens"]  # for 40 tokens
    assert all(row["status"] == 200 and row["cost"] > 0 for row in rows[:2])  # but billed for what was generated


def test_moderations_endpoint_reports_categories_and_classifier_scores(model_dir, policy, tmp_path):
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"), policy=policy)

    async def scenario(client):
        inputs = ["make an explosive device at home", "make a kite at home", "write to a@b.com"]
        return await client.post("/v1/moderations", json={"input": inputs})

    results = run(app, scenario).json()["results"]
    assert [result["flagged"] for result in results] == [True, False, True]
    assert results[0]["categories"] == {**UNCHECKED, "weapons": True, "pii": False, "rude": False}
    assert results[0]["category_scores"]["weapons"] > 0.5 > results[1]["category_scores"]["weapons"]
    assert results[2]["categories"]["pii"] and results[2]["category_scores"]["pii"] == 1.0


def test_a_moderations_body_is_parsed_off_the_event_loop(model_dir, policy, tmp_path, monkeypatch):
    """A 4 MB list of inputs took 73 ms to parse: on the event loop, every stream and /health waited for it (as they
    would for a chat's body, which is parsed in a worker thread)."""
    parsed_on_the_loop = []  # the event loop runs in the main thread (`run`)

    def parse_body_noting_its_thread(schema, raw):
        parsed_on_the_loop.append(threading.current_thread() is threading.main_thread())
        return parse_body(schema, raw)

    monkeypatch.setattr(app_module, "parse_body", parse_body_noting_its_thread)
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"), policy=policy)

    async def scenario(client):
        return await client.post("/v1/moderations", json={"input": ["make a kite at home"] * 1000})

    assert len(run(app, scenario).json()["results"]) == 1000
    assert parsed_on_the_loop == [False]  # was: [True]


def test_moderations_name_the_policy_that_ran_as_their_model_not_the_model_asked_for(model_dir, policy, tmp_path):
    """The answer echoed the `model` asked for (OpenAI's names the moderation model that ran): a client asking for
    omni-moderation-latest read that OpenAI's model had judged its text."""
    engine = Engine.from_pretrained(model_dir)
    answers = []
    for policy_served in (policy, None):
        app = create_app(engine, open_database(tmp_path / "db"), policy=policy_served)

        async def scenario(client):
            return await client.post("/v1/moderations", json={"input": "hi", "model": "omni-moderation-latest"})

        answers.append(run(app, scenario).json())
    assert [answer["model"] for answer in answers] == ["seekstack-policy:policy.yaml", "seekstack-policy:none"]
    assert answers[1]["results"] == [{
        "flagged": False, "categories": UNCHECKED, "category_scores": dict.fromkeys(OPENAI_CATEGORIES, 0.0),
        "category_applied_input_types": dict.fromkeys(OPENAI_CATEGORIES, []),
    }]  # fmt: skip


def test_a_pattern_that_backtracks_without_end_refuses_the_text_in_time(model_dir, tmp_path, monkeypatch):
    """`(?:a|aa)+$` on 34 a's and a b backtracks for seconds (Python's `re` held the GIL all along: the README's own
    e-mail pattern on 2 MB of one word froze the whole server, health checks and SIGTERM too, for hours)."""
    monkeypatch.setattr(moderation, "MATCH_TIMEOUT_S", 0.01)  # the scan takes ~8 s: 800 times that
    policy = write_policy(tmp_path, {"runs": {"action": "block", "patterns": ["(?:a|aa)+$"]}})
    database = open_database(tmp_path / "db")
    app = create_app(Engine.from_pretrained(model_dir), database, policy=policy)
    text = "a" * 34 + "b"

    async def scenario(client):
        checked = await client.post("/v1/moderations", json={"input": ["hello", text]})
        completed = await client.post("/v1/completions", json={"model": "model", "prompt": text, "max_tokens": 2})
        return checked, completed

    checked, completed = run(app, scenario)
    for response, param in ((checked, "input"), (completed, "prompt")):
        error = error_of(response, 400)
        assert (error["code"], error["param"]) == ("content_policy_timeout", param)
        assert "category 'runs': its patterns took over 0.01 s to scan 35 characters" in error["message"]
    assert [(row["status"], row["prompt_tokens"]) for row in Ledger(database).records()] == [(400, 0)]


def test_moderation_scores_agree_with_the_categories_found(policy):
    """A score at or over its category's threshold is a category found (was: the classifier read the text unfolded,
    0.50 for the fullwidth text it found at 0.84; and a term found scored the classifier's 0.16)."""
    safety = ContentSafety(policy, None)
    fullwidth = "ｍａｋｅ ａｎ ｅｘｐｌｏｓｉｖｅ ｄｅｖｉｃｅ ａｔ ｈｏｍｅ"
    inputs = [fullwidth, "a kite at home, a pipe bomb", "make a kite at home"]
    results = safety.moderations(ModerationRequest(input=inputs), None).results
    assert [result.categories["weapons"] for result in results] == [True, True, False]
    assert results[1].category_scores["weapons"] == 1.0  # its term
    for result in results:
        for name in policy.categories:
            found = result.categories[name]
            assert found == (result.category_scores[name] >= policy.categories[name].rule.threshold), (result, name)


def test_moderations_read_openai_multimodal_input_as_one_text_and_say_what_each_category_read(model_dir, policy,
                                                                                               tmp_path):  # fmt: skip
    """The openai client's `moderations.create(input=[{"type": "text", ...}])` got 400 'Input should be a valid
    string', and results lacked OpenAI's `category_applied_input_types`."""
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"), policy=policy)
    parts = [{"type": "text", "text": "how to build a pipe"}, {"type": "text", "text": "bomb"}]

    async def scenario(client):
        multimodal = await client.post("/v1/moderations", json={"input": parts})
        image = await client.post("/v1/moderations", json={"input": [*parts, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}]})  # fmt: skip
        return multimodal, image

    multimodal, image = run(app, scenario)
    [result] = multimodal.json()["results"]  # one input, its parts joined by a newline: `pipe\nbomb` is the term
    assert result["flagged"] and result["categories"] == {**UNCHECKED, "weapons": True, "pii": False, "rude": False}
    assert result["category_applied_input_types"] == {
        **dict.fromkeys(OPENAI_CATEGORIES, []),
        "weapons": ["text"],
        "pii": ["text"],
        "rude": ["text"],
    }
    error = error_of(image, 400)  # a policy of text cannot judge an image: refused, not passed unread
    assert error["param"] == "input" and "input[2] is a part of type 'image_url', which is not read" in error["message"]
    assert "Input should be a valid string" not in error["message"]  # was: each branch of the union's failure


def test_moderations_hold_openais_categories_for_the_openai_client_beside_the_policys_own(model_dir, policy, tmp_path):
    """openai-python's `results[0].categories.hate` read None, neither True nor False: a result held the policy's
    categories alone (weapons, pii, rude), none of OpenAI's names. Each of OpenAI's the policy lacks is now there: not
    found, score 0, applied to no input ([]); the policy's own stay, read as the client's extra fields."""

    async def scenario(api):
        return await api.moderations.create(input="make an explosive device at home")

    [result] = with_openai(Engine.from_pretrained(model_dir), tmp_path, scenario, policy=policy).results
    assert result.flagged and result.categories.weapons is True and result.category_scores.weapons > 0.5
    assert (result.categories.hate, result.categories.self_harm, result.categories.violence_graphic) == (False,) * 3
    assert (result.category_scores.hate, result.category_applied_input_types.hate) == (0.0, [])
    assert result.category_applied_input_types.weapons == ["text"]


@pytest.mark.parametrize("score", [float("nan"), 1.5, -0.25])
def test_a_classifier_whose_score_is_no_probability_stops_the_text_instead_of_passing_it(score, tmp_path):
    """A plugged-in `Classifier` that gave NaN let every prompt and output through (NaN >= threshold is false) and
    made /v1/moderations a bare 'Out of range float values are not JSON compliant'; one that gave 1.5 answered 1.5."""

    class Broken:
        def score(self, text: str) -> float:
            return score

    category = Category("unsafe", CategoryRule(action="block"), None, Broken())
    safety = ContentSafety(Policy("policy.yaml", [category], {}, {}), None)
    bill = Bill(None, None, "model", "/v1/completions", 0)
    expected = rf"category 'unsafe': its classifier Broken scored a text {score!r}, which is no probability in \[0, 1\]"
    with pytest.raises(ValueError, match=expected):
        safety.moderate_prompt(CompletionRequest(model="model", prompt="hello"), [category], bill)
    with pytest.raises(ValueError, match=expected):
        safety.moderations(ModerationRequest(input="hello"), None)
    with pytest.raises(ValueError, match=expected):
        ModeratedStream([category]).push("hello", final=True)


def test_terms_and_text_are_read_alike_whatever_their_unicode_form(tmp_path):
    """Each character was folded alone, so a decomposed `e` + combining acute never became the `é` of a term (text typed
    on a Mac, or a bypass), and the terms themselves were not folded: an NFD, ligature or fullwidth term matched
    nothing, not even its own spelling."""
    nfd = functools.partial(unicodedata.normalize, "NFD")
    policy = write_policy(tmp_path, {"food": {"action": "redact", "terms": ["café noir", nfd("crème brûlée"), "ﬁle",
                                                                             "ｂｏｍｂ"]}})  # fmt: skip
    food = list(policy.categories.values())
    for text, expected in (
        (nfd("un café noir!"), "un [REDACTED:food]!"),  # the marks go with their letters
        ("une crème brûlée", "une [REDACTED:food]"),
        ("a ﬁle, a file, a bomb", "a [REDACTED:food], a [REDACTED:food], a [REDACTED:food]"),
    ):
        assert redacted(text, scan(food, text)) == expected, text
    stream = ModeratedStream(food)
    shown = stream.push("un cafe")[0] + stream.push("\u0301 noir!", final=True)[0]  # the mark in the next piece
    assert shown == "un [REDACTED:food]!"


def test_terms_that_begin_or_end_with_punctuation_are_found_as_whole_words(tmp_path):
    """A term was wrapped in `\\b`, which wants a word character beside the term's `+` or `@`: `c++`, `@everyone`,
    `$$$` and `#kill` matched nothing, anywhere."""
    policy = write_policy(tmp_path, {"spam": {"action": "redact", "terms": ["c++", "@everyone", "$$$", "#kill"]}})
    spam = list(policy.categories.values())
    text = "c++ and @everyone: make $$$ or #kill, not abc++ or a@everyones"
    assert redacted(text, scan(spam, text)) == (
        "[REDACTED:spam] and [REDACTED:spam]: make [REDACTED:spam] or [REDACTED:spam], not abc++ or a@everyones"
    )


def test_terms_are_found_in_any_case_as_unicode_folds_case(tmp_path):
    """Case was matched one character for one: `straße` was not found in its own capitals, `STRASSE`."""
    policy = write_policy(tmp_path, {"roads": {"action": "redact", "terms": ["straße", "grosse"]}})
    roads = list(policy.categories.values())
    text = "DIE STRASSE, die Straße, eine GROẞE oder große Sache"
    assert redacted(text, scan(roads, text)) == (
        "DIE [REDACTED:roads], die [REDACTED:roads], eine [REDACTED:roads] oder [REDACTED:roads] Sache"
    )


def test_terms_of_scripts_written_without_spaces_are_found_inside_their_sentences(tmp_path):
    """A CJK character is a word character, so a Chinese or Japanese term had a letter beside it in any sentence and was
    found only standing alone: a blocked `炸弹` passed in `怎么制造炸弹` (a Korean noun too, with its particle:
    `폭탄을`). Latin words keep their whole-word rule."""
    terms = ["炸弹", "爆弾", "폭탄", "ระเบิด", "bomb"]
    policy = write_policy(tmp_path, {"weapons": {"action": "block", "terms": terms}})
    weapons = list(policy.categories.values())
    for text, found in (
        ("怎么制造炸弹", "炸弹"),
        ("炸弹怎么做？", "炸弹"),
        ("a炸弹b", "炸弹"),
        ("爆弾の作り方", "爆弾"),
        ("폭탄을 만드는 방법", "폭탄"),
        ("วิธีทำระเบิดที่บ้าน", "ระเบิด"),
        ("制造bomb的方法", "bomb"),
        ("a bombshell", None),
        ("abomb", None),
    ):
        assert [text[slice(*hit.span)] for hit in scan(weapons, text)] == ([found] if found else []), text
    stream = ModeratedStream(weapons)
    shown, hit = stream.push("请告诉我怎么制造炸")
    assert (shown, hit) == ("", None)  # held back: the term may be under way
    shown, hit = stream.push("弹，谢谢", final=True)
    assert (shown, hit.category, hit.action) == ("请告诉我怎么制造", "weapons", "block")


def test_a_match_at_the_end_of_a_stream_so_far_waits_for_what_follows_it(tmp_path):
    """A term at the end of the text generated so far was judged as if nothing followed it: a reply whose tokens came
    as `a bomb` then `shell` was cut (content_filter), though `a bombshell` holds no `bomb`; and an address matched up
    to `.co` was redacted, its `m` shown after the redaction."""
    address = {"action": "redact", "holdback": 0, "patterns": [r"[\w.+-]+@[\w-]+\.\w+"]}
    policy = write_policy(tmp_path, {"weapons": {"action": "block", "terms": ["bomb"]}, "pii": address})
    categories = list(policy.categories.values())
    stream = ModeratedStream(categories)
    assert stream.push("a bomb") == ("", None)
    assert stream.push("shell", final=True) == ("a bombshell", None)
    stream = ModeratedStream(categories)
    assert stream.push("a bomb") == ("", None)
    shown, hit = stream.push(" now")
    assert (shown, hit.category, hit.span) == ("a ", "weapons", (2, 6))
    stream = ModeratedStream(categories)
    pieces = [("mail jane@ex.co", False), ("m now", False), ("", True)]
    assert "".join(stream.push(piece, final)[0] for piece, final in pieces) == "mail [REDACTED:pii] now"


def test_tokenize_counts_a_prompt_as_the_content_policy_leaves_it_for_the_call(model_dir, policy, tmp_path):
    """/tokenize counted the prompt as sent, where the call reads it redacted (`[REDACTED:pii]`, more tokens than the
    address) or refuses it: a client checking a call's length first was told too few tokens, and a blocked prompt's
    count as if it could be sent."""
    engine = Engine.from_pretrained(model_dir)
    database = open_database(tmp_path / "db")
    app = create_app(engine, database, policy=policy)
    messages = [{"role": "user", "content": "mail bob@corp.com now"}]

    async def scenario(client):
        calls = [
            ("/tokenize", {"prompt": "mail bob@corp.com now"}),
            ("/v1/completions", {"prompt": "mail bob@corp.com now", "max_tokens": 1}),
            ("/tokenize", {"messages": messages}),
            ("/v1/chat/completions", {"messages": messages, "max_tokens": 1}),
            ("/tokenize", {"prompt": "how to build a pipe bomb"}),
        ]
        return [await client.post(route, json=body) for route, body in calls]

    text, completion, chat, chat_call, blocked = run(app, scenario)
    assert text.json()["count"] == completion.json()["usage"]["prompt_tokens"]
    assert text.json()["tokens"] == engine.tokenizer.encode_prompt("mail [REDACTED:pii] now")
    assert chat.json()["count"] == chat_call.json()["usage"]["prompt_tokens"]
    error = error_of(blocked, 400)
    assert (error["code"], error["param"]) == ("content_policy_violation", "prompt") and "weapons" in error["message"]
    assert [row["endpoint"] for row in Ledger(database).records()] == ["/v1/completions", "/v1/chat/completions"]
