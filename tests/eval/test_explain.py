"""Attention maps through MLA's expanded path, expert routing capture and its statistics, the explain page."""

from __future__ import annotations

import base64
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from seekstack.checkpoint import load_pretrained
from seekstack.eval.attention_maps import LayerAttention, attention_maps, attention_output
from seekstack.eval.explain import (
    FIGURE_DPI,
    MAX_PANEL_INCHES,
    _attention_png,
    _statistics_record,
    corpus_routing,
    drawable,
    explain_text,
    token_label,
)
from seekstack.eval.routing import LayerRouting, capture_routing, routing_statistics, token_class
from seekstack.tokenizer import Tokenizer
from tests.infer.support import micro_model

CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def model():
    return micro_model()


def test_attention_rows_are_causal_distributions(model):
    maps = attention_maps(model, torch.randint(0, 512, (12,)))
    assert len(maps) == model.config.num_hidden_layers
    for layer in maps:
        assert layer.weights.shape == (model.config.num_attention_heads, 12, 12)
        torch.testing.assert_close(layer.weights.sum(-1), torch.ones(layer.weights.shape[:2]))
        assert torch.all(layer.weights.triu(diagonal=1) == 0)  # no token attends to a later one
        assert layer.weights[:, 1:].max() < 1  # the maps are not trivially one-hot


def test_attention_weights_reproduce_what_the_module_returned(model):
    maps = attention_maps(model, torch.randint(0, 512, (16,)))
    for layer, layer_map in zip(model.layers, maps, strict=True):
        torch.testing.assert_close(attention_output(layer.self_attn, layer_map), layer_map.module_output)
        shuffled = layer_map.weights.flip(0)  # the same rows on the wrong heads no longer reproduce it
        assert not torch.allclose(attention_output(layer.self_attn, type(layer_map)(shuffled, layer_map.values,
                                  layer_map.module_output)), layer_map.module_output, atol=1e-4)  # fmt: skip


def test_captured_routing_counts_are_the_models_expert_load(model):
    input_ids = torch.randint(0, 512, (2, 10))
    routing = capture_routing(model, input_ids)
    expert_load = model(input_ids).expert_load  # main MoE layers first, then the MTP block's (not run here)
    assert [r.layer for r in routing] == [i for i in model.moe_layer_ids if i < model.config.num_hidden_layers]
    for index, layer in enumerate(routing):
        assert layer.experts.shape == (20, model.config.num_experts_per_tok)
        counts = torch.bincount(layer.experts.flatten(), minlength=model.config.n_routed_experts)
        assert torch.equal(counts, expert_load[index].cpu())


def test_routing_statistics_on_a_hand_built_routing():
    experts = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3], [0, 2], [1, 3]])
    classes = ["keyword", "keyword", "number", "number", "identifier", "identifier"]
    follows = torch.tensor([False, True, True, True, True, True])
    stats = routing_statistics(LayerRouting(1, experts, torch.ones(6, 2)), classes, follows, num_experts=4)
    torch.testing.assert_close(stats.load, torch.full((4,), 0.25))
    assert stats.co_selection[0, 1] == pytest.approx(2 / 6) and stats.co_selection[0, 3] == 0
    assert stats.co_selection[2, 2] == pytest.approx(3 / 6)
    assert stats.consecutive_share == pytest.approx(3 / 5)  # pairs 1-0, 3-2 and 4-3 share an expert
    torch.testing.assert_close(stats.class_load["keyword"], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(stats.class_load["identifier"], torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert stats.class_tokens == {"keyword": 2, "number": 2, "identifier": 2}


def test_routing_stats_json_writes_a_share_below_five_in_100000_as_itself_not_zero():
    """routing_stats.json rounded each share to 4 decimals: an expert taking 3 of 100,000 tokens was written load
    0.0, as one taking none, and named among the class's top experts (those that took any of its tokens) with 0.0."""
    tokens = 100_000
    experts = torch.zeros(tokens, 1, dtype=torch.long)
    experts[[10, 500, 9_000]] = 1
    follows = torch.arange(tokens) > 0
    stats = routing_statistics(LayerRouting(1, experts, torch.ones(tokens, 1)), ["keyword"] * tokens, follows, 2)
    record = _statistics_record(stats)
    assert record["load"] == [1.0, 3e-05] and record["class_load"]["keyword"] == [1.0, 3e-05]
    assert record["co_selection"] == [[1.0, 0.0], [0.0, 3e-05]]
    assert record["class_top_experts"]["keyword"] == [(0, 1.0), (1, 3e-05)]
    assert json.loads(json.dumps(record))["load"] == [1.0, 3e-05]


def test_a_token_classs_top_experts_are_its_likeliest_that_took_any_of_its_tokens():
    """routing_stats.json's class_top_experts named a class's three experts even where fewer took its tokens: a class
    routed to two experts listed a third at share 0.0, one of the many it never went to, picked by topk's tie order."""
    from seekstack.eval.explain import _statistics_record

    experts = torch.tensor([[0], [1], [0], [2], [0], [1], [3], [3], [2]])  # top-1 of 4 experts
    classes = ["keyword"] * 6 + ["number"] * 3
    stats = routing_statistics(LayerRouting(1, experts, torch.ones(9, 1)), classes, torch.ones(9, dtype=torch.bool), 4)
    top = _statistics_record(stats)["class_top_experts"]
    assert top == {"keyword": [(0, 0.5), (1, 0.3333), (2, 0.1667)], "number": [(3, 0.6667), (2, 0.3333)]}


def test_consecutive_sharing_is_measured_against_random_pairs():
    alternating = torch.tensor([[0, 1], [2, 3]]).repeat(500, 1)  # neighbours never share; half of all pairs do
    follows = torch.ones(1000, dtype=torch.bool)
    follows[0] = False
    stats = routing_statistics(LayerRouting(1, alternating, torch.ones(1000, 2)), ["mixed"] * 1000, follows, 4)
    assert stats.consecutive_share == 0
    assert stats.chance_share == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize(
    "text, expected",
    [("    ", "whitespace"), ("\n", "whitespace"), (" return", "keyword"), ("self", "identifier"),
     (" 42", "number"), ("3.5", "number"), ("):", "punctuation"), ("(self", "mixed")],
)  # fmt: skip
def test_token_class(text, expected):
    assert token_class(text) == expected


@pytest.mark.parametrize("text", [" and", " in", " is", " for", " cat", "The"])
def test_a_prose_token_that_is_a_word_is_a_word_whether_or_not_python_keeps_it(text):
    assert token_class(text, code=False) == "word"


def test_explain_writes_pngs_and_a_page_holding_the_maps(checkpoint, tmp_path):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    paths = explain_text(model, tokenizer, CODE, tmp_path)
    for name in ("attention", "routing"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    data = json.loads(re.search(r"const data = (.*);\n", page).group(1))
    assert len(data["tokens"]) == len(tokenizer.encode(CODE)) and "↵" in "".join(data["tokens"])
    tokens, layers = len(data["tokens"]), model.config.num_hidden_layers
    assert len(data["attention"]) == layers
    maps = attention_maps(model, torch.tensor(tokenizer.encode(CODE)))
    for layer, heads in enumerate(data["attention"]):
        for head, encoded in enumerate(heads):  # causal rows, one byte a weight: query q holds keys 0..q
            levels = torch.tensor(list(base64.b64decode(encoded)), dtype=torch.float32) / data["attention_levels"]
            assert len(levels) == tokens * (tokens + 1) // 2
            rows, keys = torch.tril_indices(tokens, tokens)
            torch.testing.assert_close(levels, maps[layer].weights[head][rows, keys], atol=0.5 / 255, rtol=0)
    weights = layers * model.config.num_attention_heads * tokens * tokens
    assert len(page) < 0.75 * weights + 20_000  # ~1.3 bytes a causal weight, not ~7 as JSON numbers
    assert len(data["routing"]) == 2 and len(data["routing"][0]["experts"]) == len(data["tokens"])
    assert "<script>" in page and "http" not in page  # self-contained: nothing to fetch


def test_corpus_routing_counts_every_token_once_per_layer(checkpoint):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    records = corpus_routing(model, tokenizer, [CODE * 20, "The cat sat on the mat. " * 30], window=32)
    assert len(records) == 2
    for record in records:
        assert record["tokens"] % 32 == 0 and sum(record["load"]) == pytest.approx(1, abs=1e-3)
        assert 0 <= record["chance_share"] <= 1 and 0 <= record["consecutive_share"] <= 1
        assert sum(record["class_tokens"].values()) == record["tokens"]


def test_corpus_routing_of_a_model_of_fewer_than_three_experts_names_each_classs_experts_all(checkpoint):
    """routing_stats.json names each token class's three likeliest experts: a model of two routed experts ended
    `explain --corpus` in torch's "selected index k out of range". It names those of the two that took the class's
    tokens."""
    model = micro_model(n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1)
    (first, *_) = corpus_routing(model, Tokenizer.from_file(checkpoint), [CODE * 20], window=32)
    assert set(first["class_top_experts"]) == set(first["class_load"]) >= {"keyword", "identifier", "whitespace"}
    for name, top in first["class_top_experts"].items():
        shares = first["class_load"][name]
        taken = sorted(expert for expert, share in enumerate(shares) if share > 0)
        assert sorted(expert for expert, _ in top) == taken  # each of the two that took its tokens, likeliest first
        assert [share for _, share in top] == sorted(shares, reverse=True)[: len(taken)]
        assert [share for _, share in top] == [shares[expert] for expert, _ in top]
    assert any(len(top) == 2 for top in first["class_top_experts"].values())  # a class sent to both names both


def test_corpus_routing_reads_at_most_max_tokens_cutting_the_last_window(checkpoint):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    texts = [CODE * 20, "The cat sat on the mat. " * 30]
    for max_tokens in (70, 64, 20):
        for record in corpus_routing(model, tokenizer, texts, max_tokens=max_tokens, window=32):
            assert record["tokens"] == max_tokens and sum(record["class_tokens"].values()) == max_tokens


def test_corpus_routing_windows_fit_in_the_models_context(checkpoint):
    """A model of a 64-token context routes 64-token windows, not the 256-token default past what it was trained on."""
    model, tokenizer = micro_model(max_position_embeddings=64), Tokenizer.from_file(checkpoint)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    text = CODE * 30
    assert len(tokenizer.encode(text)) > 256
    (first, *_) = corpus_routing(model, tokenizer, [text], max_tokens=1000)
    assert {width for _, width in shapes} == {64} and first["tokens"] == sum(rows * 64 for rows, _ in shapes) >= 128


def test_explain_stopped_while_writing_a_png_leaves_no_cut_one(checkpoint, tmp_path, monkeypatch):
    """savefig wrote attention.png in place: Ctrl-C (or a full disk) mid-write left a cut PNG beside the others."""
    from matplotlib.figure import Figure

    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)

    def cut_short(figure, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        explain_text(model, tokenizer, CODE, tmp_path / "explain")
    assert list((tmp_path / "explain").iterdir()) == []


def test_explain_refuses_a_text_longer_than_the_context_and_writes_nothing(checkpoint, tmp_path):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    text = "x = 1\n" * 200
    count = len(tokenizer.encode(text))
    assert count > model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"the text is {count:,} tokens, longer than the model's context of 256"):
        explain_text(model, tokenizer, text, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attention_figure_of_a_long_text_is_capped_in_size(tmp_path):
    tokens = 400  # 0.12 inch a token would be 48 inches, 5,280 px, per heatmap
    weights = torch.rand(2, tokens, tokens).tril().softmax(-1)
    maps = [LayerAttention(weights, torch.zeros(2, tokens, 4), torch.zeros(tokens, 8))]
    png = _attention_png(maps, ["t"] * tokens, tmp_path / "attention.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the PNG's IHDR
    assert width <= 2 * MAX_PANEL_INCHES * FIGURE_DPI and height <= MAX_PANEL_INCHES * FIGURE_DPI + 1


def test_the_pngs_name_their_axes_and_colour_scales(checkpoint, tmp_path, monkeypatch):
    """routing_stats.png: per layer, load (share of assignments against the balanced 1/E), co-selection and class
    shares over experts, each heatmap with its colour scale; attention.png: the attention weight's colour scale."""
    from matplotlib.figure import Figure

    from seekstack.eval.explain import routing_png

    figures, savefig = [], Figure.savefig

    def kept(figure, *args, **kwargs):  # the figure as it is saved, to read its labels
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    routing_png(corpus_routing(model, tokenizer, [CODE * 20], window=32), tmp_path / "routing_stats.png")
    maps = [LayerAttention(torch.rand(2, 3, 3).tril().softmax(-1), torch.zeros(2, 3, 4), torch.zeros(3, 8))]
    _attention_png(maps, ["a", "b", "c"], tmp_path / "attention.png")
    routing, attention = ([(axis.get_xlabel(), axis.get_ylabel()) for axis in figure.axes] for figure in figures)
    layers = model.config.moe_layer_count
    assert routing.count(("expert", "share of assignments")) == layers
    assert routing.count(("expert", "expert")) == layers
    assert routing.count(("", "share of tokens choosing both")) == layers
    assert routing.count(("", "share of the class's assignments")) == layers
    legends = [axis.get_legend() for axis in figures[0].axes if axis.get_legend() is not None]
    assert [text.get_text() for legend in legends for text in legend.get_texts()] == ["balanced: 1/E"] * layers
    assert ("", "attention weight (each row sums to 1)") in attention


def test_the_routing_pngs_tick_whole_expert_ids_and_name_their_token_axis_and_colour_scales(tmp_path, monkeypatch):
    """With 4 experts matplotlib ticked the load bar chart at -0.5, 0.5, ..., 3.5 and the co-selection map's rows at
    0.5, 1.5, ...: ticks that name no expert."""
    from matplotlib.figure import Figure

    from seekstack.eval.explain import _routing_png, _statistics_record, routing_png

    figures, savefig = [], Figure.savefig

    def kept(figure, *args, **kwargs):  # the figure as it is saved, to read its ticks
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    routing = LayerRouting(1, torch.tensor([[0, 1], [2, 3], [0, 2]]), torch.full((3, 2), 0.5))
    stats = routing_statistics(routing, ["keyword", "number", "identifier"], torch.tensor([False, True, True]), 4)
    routing_png([_statistics_record(stats)], tmp_path / "routing_stats.png")
    _routing_png([routing, routing], ["a", "b", "c"], 4, tmp_path / "routing.png")
    expert_axes = [
        (axis.xaxis, *((axis.yaxis,) if axis.get_ylabel() == "expert" else ()))
        for figure in figures
        for axis in figure.axes
        if axis.get_xlabel() == "expert"
    ]
    assert len(expert_axes) == 3 + 2  # load, co-selection, class shares; routing.png's two layers
    # routing.png named its colour scales and its token axis nowhere
    routing_labels = [(axis.get_xlabel(), axis.get_ylabel()) for axis in figures[1].axes]
    assert routing_labels == [("expert", "token"), ("expert", ""), ("", "gate weight"), ("", "gate weight")]
    for axes in expert_axes:
        for axis in axes:
            low, high = sorted(axis.get_view_interval())
            shown = [tick for tick in axis.get_majorticklocs() if low <= tick <= high]
            assert shown and all(float(tick).is_integer() for tick in shown), shown


def test_token_labels_show_pieces_of_a_character_as_bytes(checkpoint):
    tokenizer = Tokenizer.from_file(checkpoint)
    ids = tokenizer.encode("你好 x\n")
    labels = [token_label(tokenizer, i) for i in ids]
    assert labels == ["<e4>", "<bd>", "<a0>", "<e5>", "<a5>", "<bd>", "␣x", "↵"]  # the tiny vocabulary splits 你好
    assert token_label(tokenizer, tokenizer.bos_id) == tokenizer.decode([tokenizer.bos_id])


def test_an_added_token_is_labelled_with_its_own_text(checkpoint):
    """An added 'café' is all byte-level stand-ins: read as a vocabulary piece it was labelled 'caf<e9>'."""
    backend = Tokenizer.from_file(checkpoint).backend
    backend.add_tokens(["café", "đem"])
    tokenizer = Tokenizer(backend)
    assert [token_label(tokenizer, i) for i in tokenizer.encode("café đem")] == ["café", "␣", "đem"]


# first_k_dense_replace 4: the micro model's 3 layers and its MTP module (block 3) dense; 3: the MTP module routes (a
# dense student with DeepSeek-V3's MoE MTP module), which the maps, drawn of the main model, leave out
NO_ROUTING_NOTES = {
    4: "The model has no MoE layers (a dense FFN in every layer): no token is routed to experts.",
    3: "The main model has no MoE layers (a dense FFN in every layer): no token is routed to experts there. Its MTP "
    "module (block 3) routes to experts (predicting tokens further ahead, in training and speculative decoding); "
    "explain draws the main model's layers alone.",
}


@pytest.mark.parametrize("first_k_dense_replace", [4, 3])
def test_corpus_routing_of_a_model_without_moe_layers_says_so(checkpoint, first_k_dense_replace):
    dense = micro_model(first_k_dense_replace=first_k_dense_replace)
    with pytest.raises(ValueError) as refusal:
        corpus_routing(dense, Tokenizer.from_file(checkpoint), [CODE * 20], window=32)
    assert str(refusal.value) == (
        f"{NO_ROUTING_NOTES[first_k_dense_replace]} Routing statistics need the main model's routed experts; explain "
        "a text for its attention"
    )


@pytest.mark.parametrize("first_k_dense_replace", [4, 3])
def test_explaining_a_text_on_a_model_without_moe_layers_says_it_has_none(checkpoint, tmp_path, first_k_dense_replace):
    """A model whose MTP module routes was said to have no MoE layers at all ("The model has no MoE layers")."""
    dense, tokenizer = micro_model(first_k_dense_replace=first_k_dense_replace), Tokenizer.from_file(checkpoint)
    paths = explain_text(dense, tokenizer, CODE, tmp_path)
    data = json.loads(re.search(r"const data = (.*);\n", paths["html"].read_text()).group(1))
    assert "routing" not in paths and data["routing"] == [] and data["num_experts"] == 0
    assert data["routing_note"] == NO_ROUTING_NOTES[first_k_dense_replace]


def test_corpus_routing_without_a_whole_window_names_the_source_and_the_window(checkpoint):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    with pytest.raises(ValueError, match="corpus/val.jsonl: no document fills a window of 256 tokens .*shorter than"):
        corpus_routing(model, tokenizer, ["x = 1\n", CODE], source="corpus/val.jsonl")


def test_corpus_routing_names_the_source_and_document_that_is_not_utf8(checkpoint):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    with pytest.raises(ValueError, match=r"^corpus/val.jsonl: document 2 of the 2 given is not valid UTF-8"):
        corpus_routing(model, tokenizer, [CODE * 20, "half \ud83d an emoji"], source="corpus/val.jsonl")


def test_explain_refuses_the_3d_attention_variant_whose_output_the_maps_do_not_give(checkpoint, tmp_path):
    variant, tokenizer = micro_model(attention_variant="3d"), Tokenizer.from_file(checkpoint)
    with pytest.raises(ValueError, match="attention_variant='3d' is a training ablation .* channel gate"):
        explain_text(variant, tokenizer, CODE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_show_control_characters_and_the_pngs_draw_no_empty_boxes(checkpoint, tmp_path):
    model, tokenizer = load_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    ids = tokenizer.encode("<｜end▁of▁sentence｜>a\r\x0b\x0c b")
    assert [token_label(tokenizer, i) for i in ids][1:5] == ["a", "\\r", "\\x0b", "\\x0c"]
    assert drawable("<｜end▁of▁sentence｜>你🚀 $x$") == "<\\uff5cend▁of▁sentence\\uff5c>\\u4f60\\U0001f680 \\$x\\$"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of each glyph its font lacks
        explain_text(model, tokenizer, "<｜end▁of▁sentence｜>a\r\x0b\x0c b", tmp_path)


def test_a_token_holding_a_closing_script_tag_leaves_the_pages_script_whole(checkpoint, tmp_path):
    """A web-text tokenizer's `</script>` token, written into the page's data as it was, ended the page's script there:
    the browser read `const data = {"tokens": [..., "` as the whole program and showed nothing."""
    from html.parser import HTMLParser

    import seekstack
    from tests.conftest import micro_config
    from tests.infer.support import VOCAB

    backend = Tokenizer.from_file(checkpoint).backend
    backend.add_tokens(["</script>", "<!--"])
    tokenizer = Tokenizer(backend)
    torch.manual_seed(0)
    model = seekstack.Transformer(micro_config(vocab_size=VOCAB + 2)).eval()

    class Scripts(HTMLParser):
        """The text of each <script> element, as a browser's parser splits the page."""

        def __init__(self) -> None:
            super().__init__()
            self.texts: list[str] = []
            self.inside = False

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.inside = tag == "script"

        def handle_endtag(self, tag: str) -> None:
            self.inside = False

        def handle_data(self, data: str) -> None:
            if self.inside:
                self.texts.append(data)

    scripts = Scripts()
    scripts.feed(explain_text(model, tokenizer, "print('</script>') <!--", tmp_path)["html"].read_text())
    assert len(scripts.texts) == 1 and scripts.texts[0].rstrip().endswith("});")  # the script reaches its own end
    data = json.loads(re.search(r"const data = (.*);\n", scripts.texts[0]).group(1))
    assert "</script>" in data["tokens"] and "<!--" in data["tokens"]


def test_the_pngs_label_their_tokens_wherever_a_row_has_room_for_a_label(tmp_path, monkeypatch):
    """Past 48 tokens neither PNG named a token: routing.png's 100 rows of 0.14 inch (15 px for a 6-point label) and
    attention.png's 60 columns of 0.1 inch went unlabelled, the routing of each token unreadable but on the page."""
    from matplotlib.figure import Figure

    from seekstack.eval.explain import _routing_png

    figures, savefig = [], Figure.savefig

    def kept(figure, *args, **kwargs):  # the figure as it is saved, to read its tick labels
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)

    def routing_labels(count: int) -> list[str]:
        tokens = [f"t{i}" for i in range(count)]
        routing = LayerRouting(1, torch.tensor([[0, 1]]).repeat(count, 1), torch.full((count, 2), 0.5))
        _routing_png([routing], tokens, 4, tmp_path / "routing.png")
        return [label.get_text() for label in figures[-1].axes[0].get_yticklabels()]

    def attention_labels(count: int) -> list[str]:
        tokens = [f"t{i}" for i in range(count)]
        maps = [LayerAttention(torch.rand(2, count, count).tril().softmax(-1), torch.zeros(2, count, 4),
                               torch.zeros(count, 8))]  # fmt: skip
        _attention_png(maps, tokens, tmp_path / "attention.png")
        return [label.get_text() for label in figures[-1].axes[0].get_xticklabels()]

    assert routing_labels(100) == [f"t{i}" for i in range(100)] and routing_labels(800) == []
    assert attention_labels(60) == [f"t{i}" for i in range(60)] and attention_labels(100) == []


def test_the_routing_pngs_title_clears_its_layers_however_many_tokens(tmp_path, monkeypatch):
    """From ~120 tokens on, routing.png's title was drawn over the titles and tops of its layers' heatmaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from seekstack.eval.explain import _routing_png

    figures, savefig = [], Figure.savefig

    def kept(figure, *args, **kwargs):  # the figure as it is saved, to measure where its texts lie
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    for count in (12, 120, 1000):
        routing = LayerRouting(1, torch.tensor([[0, 1]]).repeat(count, 1), torch.full((count, 2), 0.5))
        _routing_png([routing, routing], [f"t{i}" for i in range(count)], 8, tmp_path / "routing.png")
        renderer = FigureCanvasAgg(figures[-1]).get_renderer()
        title = figures[-1]._suptitle.get_window_extent(renderer)  # the figure holds its suptitle Text there
        for axis in figures[-1].axes:
            assert not title.overlaps(axis.get_window_extent(renderer)), (count, axis.get_title())
            assert not axis.get_title() or not title.overlaps(axis.title.get_window_extent(renderer)), count


@pytest.mark.parametrize(
    "case_name",
    ["v3-q-lora-grouped", "v3-no-q-lora-ungrouped", "v3-yarn-unequal-mscale-rotate-half", "v2-group-limited-greedy"],
)
def test_maps_and_routing_are_transformers_attention_probabilities_and_router_choices(case_name, tmp_path):
    """On a transformers DeepseekV2/V3 checkpoint with random weights (routing bias included): each layer's maps are
    the probabilities its eager attention returns with output_attentions (decoupled RoPE, YaRN's mscale, the causal
    mask), and the routing is its router's top-k experts and gate weights (group-limited, the bias choosing only)."""
    import copy

    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.test_hf_parity import CASES, TINY, randomise

    case = next(case for case in CASES if case.name == case_name)
    config_class, model_class = (
        (DeepseekV3Config, DeepseekV3ForCausalLM) if case.version == 3 else (DeepseekV2Config, DeepseekV2ForCausalLM)
    )
    config = config_class(**copy.deepcopy({**TINY, **case.overrides}))
    config.num_key_value_heads = config.num_attention_heads  # MLA's keys are per head; transformers repeats none
    config._attn_implementation = "eager"  # the one that returns its probabilities
    torch.manual_seed(0)
    reference = model_class(config).eval()
    randomise(reference, seed=0)
    reference.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (1, case.seq_len), generator=torch.Generator().manual_seed(0))
    chosen = []  # each MoE layer's router output: (logits, top-k weights, top-k experts)
    for layer in reference.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda module, args, output: chosen.append(output))
    with torch.no_grad():
        attentions = reference(input_ids, output_attentions=True).attentions
    for layer_map, probabilities in zip(attention_maps(ours, input_ids[0]), attentions, strict=True):
        torch.testing.assert_close(layer_map.weights, probabilities[0], atol=1e-6, rtol=0)
    routing = capture_routing(ours, input_ids)
    assert len(routing) == len(chosen) > 0
    for layer, (_, weights, experts) in zip(routing, chosen, strict=True):
        ours_order, theirs_order = layer.experts.sort(dim=-1), experts.sort(dim=-1)
        assert torch.equal(ours_order.values, theirs_order.values)
        torch.testing.assert_close(layer.weights.gather(1, ours_order.indices), weights.gather(1, theirs_order.indices))
