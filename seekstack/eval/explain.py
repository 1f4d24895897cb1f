"""`seekstack explain`: what a checkpoint does with one text (attention maps per layer and head, experts per
token) as PNGs and one self-contained HTML page, and its routing over a corpus (statistics, a PNG, JSON)."""

from __future__ import annotations

import base64
import functools
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from seekstack.atomic import write_atomic  # noqa: E402
from seekstack.config import ModelConfig  # noqa: E402
from seekstack.eval.attention_maps import LayerAttention, attention_maps  # noqa: E402
from seekstack.eval.routing import (  # noqa: E402
    TOKEN_CLASSES,
    LayerRouting,
    RoutingStatistics,
    capture_routing,
    routing_statistics,
    token_class,
)
from seekstack.model.transformer import Transformer  # noqa: E402
from seekstack.tokenizer import Tokenizer, byte_level_bytes  # noqa: E402
from seekstack.train.plot import save_figure  # noqa: E402

LABEL_POINTS = 6  # a token label's font size; a heatmap labels its tokens where each row (column) is this tall
FIGURE_DPI = 110
TITLE_POINTS = 12.0  # a figure title's font size (matplotlib's "large"), smaller where its longest line needs
TITLE_CHARACTER_EMS = 0.6  # a title character's width, in ems, a little above DejaVu Sans's mean
MAX_PANEL_INCHES = 6.0  # one attention heatmap at most this wide (660 px): longer texts are drawn resampled
MAX_FIGURE_INCHES = 60.0  # a whole figure at most this wide and tall, however many layers, heads, experts
ROUTING_BATCH = 16  # windows per forward pass of corpus_routing
TOP_EXPERTS = 3  # routing_stats.json's class_top_experts: at most this many experts taking most of a class's tokens
SHARE_DIGITS = 4  # routing_stats.json's shares (load, co-selection, class load): significant digits, not decimals
ATTENTION_LEVELS = 255  # the page holds each attention weight as one byte, round(p * 255): the shading's own depth
NO_MOE_LAYERS = "The model has no MoE layers (a dense FFN in every layer): no token is routed to experts."
WHITESPACE_SIGNS = {" ": "␣", "\n": "↵", "\t": "→"}  # how a token label shows them; other unprintables: escaped
# Every file explain writes into --out: the text's (explain_text) and the corpus's routing statistics
OUTPUT_FILES = ("attention.png", "routing.png", "explain.html", "routing_stats.png", "routing_stats.json")


def no_routing_note(config: ModelConfig) -> str:
    """What explain says of a model whose main layers route nothing: NO_MOE_LAYERS, or, where its MTP modules hold
    MoE blocks (a dense student with DeepSeek-V3's MTP module), that those route and are not drawn."""
    routed = config.mtp_moe_blocks
    if not routed:
        return NO_MOE_LAYERS
    several = len(routed) > 1
    modules = f"MTP module{'s' if several else ''} (block{'s' if several else ''} {', '.join(map(str, routed))})"
    return (
        "The main model has no MoE layers (a dense FFN in every layer): no token is routed to experts there. Its "
        f"{modules} route{'' if several else 's'} to experts (predicting tokens further ahead, in training and "
        "speculative decoding); explain draws the main model's layers alone."
    )


def visible(token: str) -> str:
    """A token's text with its whitespace shown (space as ␣, newline as ↵, tab as →) and any other character that
    prints nothing (\\r, \\x0b, \\x0c, U+2028, ...) as its escape, `\\r`."""
    return "".join(WHITESPACE_SIGNS.get(char) or (char if char.isprintable() else repr(char)[1:-1]) for char in token)


@functools.cache
def _label_font_characters() -> frozenset[int]:
    """The code points the PNGs' label font (matplotlib's default) has a glyph for."""
    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def drawable(label: str) -> str:
    """A label as the PNGs draw it: a character the font has no glyph for (你, an emoji, ｜) as its escape,
    `\\u4f60`, rather than an empty box, and `$` escaped (matplotlib reads $...$ as math)."""
    font = _label_font_characters()
    escaped = (char if ord(char) in font else char.encode("unicode_escape").decode("ascii") for char in label)
    return "".join(escaped).replace("$", r"\$")


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text for a label, whitespace shown; bytes that are only part of a character (a byte-level piece of
    你 or an emoji) as their hex values, <e4><bd>, where decoding them alone would give U+FFFD."""
    piece = tokenizer.decoder_piece(token_id)
    raw, parts = byte_level_bytes(piece), []
    if piece in tokenizer.special_tokens or raw is None:
        return visible(tokenizer.decode([token_id]))  # a special token, or a tokenizer that is not byte-level
    while raw:
        try:
            parts.append(visible(raw.decode("utf-8")))
            break
        except UnicodeDecodeError as error:
            parts.append(visible(raw[: error.start].decode("utf-8")))
            parts.append("".join(f"<{byte:02x}>" for byte in raw[error.start : error.end]))
            raw = raw[error.end :]
    return "".join(parts)


def explain_text(
    model: Transformer, tokenizer: Tokenizer, text: str, out_dir: str | Path, checkpoint: str | Path = ""
) -> dict[str, Path]:
    """Write attention.png, routing.png and explain.html for `text` into `out_dir`; return the paths by name. Each
    PNG's title names the `checkpoint` the model was loaded from, where given (`_title`).
    ValueError, before anything is written, for a text longer than the model's context and for a model whose
    attention the maps do not describe (`attention_maps`). The text is encoded as `generate` encodes a prompt: a
    DeepSeek release's BOS first (`Tokenizer.encode_prompt`)."""
    if not tokenizer.encode(text):
        raise ValueError("the text is empty: nothing to explain")
    ids = tokenizer.encode_prompt(text)
    context = model.config.max_position_embeddings
    if len(ids) > context:
        raise ValueError(
            f"the text is {len(ids):,} tokens, longer than the model's context of {context:,} tokens "
            f"(max_position_embeddings): explain at most {context:,} tokens, e.g. a part of the text"
        )
    input_ids = torch.tensor(ids)
    tokens = [token_label(tokenizer, i) for i in ids]
    maps = attention_maps(model, input_ids)
    routing = capture_routing(model, input_ids.view(1, -1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [drawable(token) for token in tokens]
    paths = {
        "attention": _attention_png(maps, labels, out_dir / "attention.png", checkpoint),
        "html": out_dir / "explain.html",
    }
    if routing:
        routing_path = out_dir / "routing.png"
        paths["routing"] = _routing_png(routing, labels, model.config.n_routed_experts, routing_path, checkpoint)
    data = {
        "tokens": tokens,
        "attention": [[_causal_bytes(head) for head in m.weights] for m in maps],
        "attention_levels": ATTENTION_LEVELS,
        "routing": [
            {
                "layer": r.layer,
                "experts": r.experts.tolist(),
                "weights": [[round(w, 4) for w in row] for row in r.weights.tolist()],
            }
            for r in routing
        ],  # fmt: skip
        "num_experts": model.config.n_routed_experts if routing else 0,
        "routing_note": "" if routing else no_routing_note(model.config),
    }
    page = _PAGE.replace("__DATA__", _script_json(data)).replace("__TITLE__", html.escape(text[:60]))
    write_atomic(paths["html"], page)
    return paths


def _script_json(data: dict[str, Any]) -> str:
    """`data` as JSON to put inside the page's <script>: each `<` as its escape \\u003c, so a token holding
    `</script>` or `<!--` (a web-text tokenizer's) ends no script and opens no comment: the browser reads the same
    strings."""
    return json.dumps(data).replace("<", "\\u003c")


def remove_earlier_outputs(out_dir: str | Path, written: Iterable[Path]) -> list[Path]:
    """Delete the files of OUTPUT_FILES in `out_dir` that this run did not write (an earlier run's, with another
    text, model or corpus, would read as this one's); return them. Any other file there is left alone."""
    kept = {Path(path).name for path in written}
    stale = [Path(out_dir) / name for name in OUTPUT_FILES if name not in kept and (Path(out_dir) / name).is_file()]
    for path in stale:
        path.unlink()
    return stale


def _causal_bytes(weights: torch.Tensor) -> str:
    """One head's causal attention (T, T) for the page: the lower triangle's rows (query q: keys 0..q) one after
    another, each weight as a byte of ATTENTION_LEVELS levels, in base64. A 1,000-token text's page takes ~1.3 bytes
    a weight (~11 MB for the demo model's 16 heads) rather than ~7 as JSON numbers (97 MB)."""
    rows, keys = torch.tril_indices(*weights.shape)
    levels = (weights[rows, keys] * ATTENTION_LEVELS).round().to(torch.uint8)
    return base64.b64encode(levels.numpy().tobytes()).decode("ascii")


def _title(figure: Figure, title: str, checkpoint: str | Path) -> None:
    """The figure's title, with a line naming the checkpoint it was drawn from where one is given (a PNG kept or
    shared apart from its folder still says which model it shows), at a size whose longest line fits the figure's
    width: a path is no words to wrap, and a narrow figure (one MoE layer's routing) cut it at both sides."""
    text = f"{title}\ncheckpoint: {checkpoint}" if str(checkpoint) else title
    longest = max(len(line) for line in text.splitlines())
    points = min(TITLE_POINTS, 0.9 * figure.get_figwidth() * 72 / (TITLE_CHARACTER_EMS * longest))
    figure.suptitle(text, fontsize=points)


def _attention_png(maps: list[LayerAttention], tokens: list[str], path: Path, checkpoint: str | Path = "") -> Path:
    """One heatmap per layer and head; each at most MAX_PANEL_INCHES, the figure at most MAX_FIGURE_INCHES a side,
    so a long text's maps are drawn resampled (the page holds every weight) and not at 0.12 inch per token."""
    layers, heads = len(maps), maps[0].weights.shape[0]
    size = min(max(2.2, 0.12 * len(tokens)), MAX_PANEL_INCHES, MAX_FIGURE_INCHES / max(layers, heads))
    figure, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    labelled = _labels_fit(size, len(tokens))
    for layer, layer_map in enumerate(maps):
        for head in range(heads):
            axis = axes[layer][head]
            image = axis.imshow(layer_map.weights[head].numpy(), cmap="viridis", vmin=0, vmax=1)
            axis.set_title(f"layer {layer} head {head}", fontsize=8)
            axis.set_xticks(range(len(tokens)) if labelled and layer == layers - 1 else [])
            axis.set_yticks(range(len(tokens)) if labelled and head == 0 else [])
            if labelled:
                axis.set_xticklabels(tokens if layer == layers - 1 else [], rotation=90, fontsize=LABEL_POINTS)
                axis.set_yticklabels(tokens if head == 0 else [], fontsize=LABEL_POINTS)
    title = "attention (row: query token, column: key token)"
    if size * FIGURE_DPI < len(tokens):
        title += f"; {len(tokens)} tokens drawn in {int(size * FIGURE_DPI)} px, resampled: explain.html holds them all"
    _title(figure, title, checkpoint)
    figure.tight_layout(rect=(0, 0, 0.9, 0.98))  # room for the title, and on the right for the colour scale
    scale = figure.add_axes((0.92, 0.2, 0.02, 0.6))
    figure.colorbar(image, cax=scale, label="attention weight (each row sums to 1)")
    save_figure(figure, path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def _routing_png(
    routing: list[LayerRouting], tokens: list[str], num_experts: int, path: Path, checkpoint: str | Path = ""
) -> Path:
    """Per MoE layer, the gate weight of each token's selected experts (row: token, column: expert), the rows labelled
    with the tokens where they are tall enough for a label."""
    width = min(3 + 0.25 * num_experts * len(routing), MAX_FIGURE_INCHES)
    height = min(2 + 0.14 * len(tokens), MAX_FIGURE_INCHES)
    labelled = _labels_fit(height - 2, len(tokens))  # ~2 inches of title, expert axis and margins
    # constrained: tight_layout put a tall figure's title over the layers' (from ~120 tokens)
    figure, axes = plt.subplots(1, len(routing), figsize=(width, height), layout="constrained")
    axes = axes if len(routing) > 1 else [axes]
    for axis, layer in zip(axes, routing, strict=True):
        grid = torch.zeros(len(tokens), num_experts).scatter_(1, layer.experts, layer.weights)
        image = axis.imshow(grid.numpy(), cmap="magma_r", aspect="auto")
        axis.set_title(f"layer {layer.layer}", fontsize=9)
        _label_experts(axis.xaxis)
        axis.set_yticks(range(len(tokens)) if labelled else [])
        if labelled:
            axis.set_yticklabels(tokens, fontsize=LABEL_POINTS)
        figure.colorbar(image, ax=axis, fraction=0.05, label="gate weight")
    axes[0].set_ylabel("token")
    _title(figure, "gate weight of each selected expert, per token", checkpoint)
    save_figure(figure, path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def _labels_fit(inches: float, tokens: int) -> bool:
    """Whether `tokens` rows (or columns) drawn in `inches` each have room for a label of LABEL_POINTS points."""
    return inches / tokens >= LABEL_POINTS / 72


def _label_experts(axis: Axis) -> None:
    """Name an axis of expert ids "expert", its ticks whole numbers (with few experts matplotlib would put ticks at
    0.5, 1.5, ..., which name no expert)."""
    axis.set_label_text("expert")
    axis.set_major_locator(MaxNLocator(integer=True))


@torch.no_grad()
def corpus_routing(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    max_tokens: int = 32768,
    window: int = 256,
    source: str = "the texts",
    code: bool = True,
) -> list[dict[str, Any]]:
    """Routing statistics of every MoE layer over the first `max_tokens` tokens of `texts`, cut in windows of
    `window` tokens, or of the model's context when that is shorter (each its own sequence); one JSON-ready dict per
    layer, its tokens in Python's classes when the texts are `code`, else in prose's (`token_class`). ValueError for
    a model without MoE layers, which routes nothing, and for texts (read from `source`) of which none fills a window
    or one is not UTF-8."""
    if not model.config.moe_layer_count:
        raise ValueError(
            f"{no_routing_note(model.config)} Routing statistics need the main model's routed experts; explain a text "
            "for its attention"
        )
    window = min(window, model.config.max_position_embeddings)  # positions past the context were never trained
    try:
        texts_ids = tokenizer.encode_batch(texts)
    except ValueError as error:  # a document holding a lone surrogate
        raise ValueError(f"{source}: {error}") from None
    rows = _token_windows(texts_ids, window, max_tokens)
    if not rows:
        longest = max(map(len, texts_ids), default=0)
        raise ValueError(
            f"{source}: no document fills a window of {window} tokens ({len(texts)} documents, the longest "
            f"{longest} tokens); documents shorter than a window are skipped: give a corpus with longer documents"
        )
    classes = [token_class(tokenizer.decode([i]), code) for row in rows for i in row]
    follows = torch.cat([torch.arange(len(row)) > 0 for row in rows])  # a window's first token follows nothing
    whole = [row for row in rows if len(row) == window]
    batches = [whole[start : start + ROUTING_BATCH] for start in range(0, len(whole), ROUTING_BATCH)]
    batches += [rows[len(whole) :]] if len(rows) > len(whole) else []  # the last window, cut short at max_tokens
    stats = [capture_routing(model, torch.tensor(batch)) for batch in batches]
    records = []
    for layer_index, first in enumerate(stats[0]):
        experts = torch.cat([batch[layer_index].experts for batch in stats])
        weights = torch.cat([batch[layer_index].weights for batch in stats])
        joined = LayerRouting(first.layer, experts, weights)
        records.append(_statistics_record(routing_statistics(joined, classes, follows, model.config.n_routed_experts)))
    return records


def _token_windows(texts_ids: list[list[int]], window: int, max_tokens: int) -> list[list[int]]:
    """Each text's consecutive `window`-token pieces (a tail shorter than a window left out), in order, until they
    hold `max_tokens` tokens: the last piece is cut to end there."""
    rows: list[list[int]] = []
    left = max_tokens
    for ids in texts_ids:
        for start in range(0, len(ids) - window + 1, window):
            if left <= 0:
                return rows
            rows.append(ids[start : start + min(window, left)])
            left -= len(rows[-1])
    return rows


def _share(value: float) -> float:
    """A share as routing_stats.json writes it: to SHARE_DIGITS significant digits, so one expert's 3 assignments in
    100,000 read 3e-05, not 0.0 as if it took none (4 decimals did)."""
    return float(f"{value:.{SHARE_DIGITS}g}")


def _statistics_record(stats: RoutingStatistics) -> dict[str, Any]:
    load = stats.load
    top = {  # each class's TOP_EXPERTS likeliest experts, or all of a model's fewer; never one it sent no token
        name: [
            (int(e), _share(float(share)))
            for share, e in zip(*class_load.topk(min(TOP_EXPERTS, len(class_load))), strict=True)
            if share > 0
        ]
        for name, class_load in stats.class_load.items()
    }
    return {
        "layer": stats.layer,
        "tokens": sum(stats.class_tokens.values()),
        "load": [_share(v) for v in load.tolist()],
        "max_violation": float((load.max() - load.mean()) / load.mean()),
        "co_selection": [[_share(v) for v in row] for row in stats.co_selection.tolist()],
        "consecutive_share": stats.consecutive_share,
        "chance_share": stats.chance_share,
        "class_tokens": stats.class_tokens,
        "class_top_experts": top,
        "class_load": {name: [_share(v) for v in value.tolist()] for name, value in stats.class_load.items()},
    }


def routing_png(records: list[dict[str, Any]], path: str | Path, checkpoint: str | Path = "") -> Path:
    """Per layer: load per expert, co-selection, and the share of each token class's assignments per expert; the
    title names the `checkpoint` the model was loaded from, where given."""
    figure, axes = plt.subplots(len(records), 3, figsize=(15, 3.4 * len(records)), squeeze=False)
    for row, record in zip(axes, records, strict=True):
        experts = range(len(record["load"]))
        row[0].bar(experts, record["load"])
        row[0].axhline(1 / len(record["load"]), color="gray", linestyle="--", linewidth=1, label="balanced: 1/E")
        row[0].legend(fontsize=8)
        row[0].set_title(f"layer {record['layer']}: load per expert (MaxVio {record['max_violation']:.2f})", fontsize=9)
        row[0].set_ylabel("share of assignments")
        co_selection = row[1].imshow(record["co_selection"], cmap="viridis")
        figure.colorbar(co_selection, ax=row[1], label="share of tokens choosing both")
        row[1].set_title(
            f"co-selection; consecutive tokens share an expert {record['consecutive_share']:.1%} "
            f"(chance {record['chance_share']:.1%})",
            fontsize=9,
        )
        _label_experts(row[1].yaxis)
        names = [name for name in TOKEN_CLASSES if name in record["class_load"]]
        class_load = row[2].imshow([record["class_load"][name] for name in names], cmap="magma_r", aspect="auto")
        figure.colorbar(class_load, ax=row[2], label="share of the class's assignments")
        row[2].set_yticks(range(len(names)))
        row[2].set_yticklabels([f"{name} ({record['class_tokens'][name]})" for name in names], fontsize=8)
        row[2].set_title("share of each class's assignments per expert", fontsize=9)
        for axis in row:
            _label_experts(axis.xaxis)
    _title(figure, "routing statistics", checkpoint)
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
    plt.close(figure)
    return Path(path)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>seekstack explain: __TITLE__</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
.tok { font-family: monospace; padding: 2px 1px; margin: 1px; display: inline-block; border-radius: 3px;
       border: 1px solid #ddd; cursor: pointer; white-space: pre; }
.tok.query { outline: 2px solid #d33; }
table.routing td { font-family: monospace; font-size: 11px; padding: 1px 4px; text-align: center; }
</style></head><body>
<h2>Attention</h2>
<p>layer <select id="layer"></select> head <select id="head"></select>
Hover a token (click to hold): the others are shaded by the attention it pays them.</p>
<div id="tokens"></div>
<h2>Expert routing</h2><p id="routing_note">Each token's selected experts, shaded by gate weight.</p>
<div id="routing"></div>
<script>
const data = __DATA__;
const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
data.attention.forEach((_, i) => layerSelect.add(new Option(i, i)));
headSelect.add(new Option("mean", "mean"));
data.attention[0].forEach((_, i) => headSelect.add(new Option(i, i)));
const box = document.getElementById("tokens");
const spans = data.tokens.map((token, i) => {
  const span = document.createElement("span");
  span.className = "tok"; span.textContent = token; box.appendChild(span);
  span.onmouseenter = () => { if (held === null) show(i); };
  span.onclick = () => { held = held === i ? null : i; show(i); };
  return span;
});
let held = null;
// Each head's causal rows as bytes (query q: keys 0..q at q (q + 1) / 2), decoded once per head.
const decoded = new Map();
function weightsOf(layer, head) {
  const key = `${layer}/${head}`;
  if (!decoded.has(key)) decoded.set(key, Uint8Array.from(atob(data.attention[layer][head]), c => c.charCodeAt(0)));
  return decoded.get(key);
}
function headRow(layer, head, query) {
  const start = query * (query + 1) / 2, levels = weightsOf(layer, head).subarray(start, start + query + 1);
  return data.tokens.map((_, key) => key <= query ? levels[key] / data.attention_levels : 0);
}
function row(query) {
  const layer = layerSelect.value, heads = data.attention[layer].map((_, head) => headRow(layer, head, query));
  if (headSelect.value !== "mean") return heads[headSelect.value];
  return heads[0].map((_, key) => heads.reduce((sum, head) => sum + head[key], 0) / heads.length);
}
function show(query) {
  const weights = row(query);
  spans.forEach((span, key) => {
    span.style.background = `rgba(30, 90, 200, ${weights[key]})`;
    span.style.color = weights[key] > 0.5 ? "white" : "black";
    span.classList.toggle("query", key === query);
    span.title = `attention ${weights[key].toFixed(2)}`;
  });
}
layerSelect.onchange = headSelect.onchange = () => show(held === null ? 0 : held);
show(0);
const routing = document.getElementById("routing");
if (data.routing_note) document.getElementById("routing_note").textContent = data.routing_note;
data.routing.forEach(layer => {
  const table = document.createElement("table"); table.className = "routing";
  table.innerHTML = `<caption>layer ${layer.layer}</caption>`;
  const head = table.insertRow(); head.insertCell().textContent = "token";
  for (let e = 0; e < data.num_experts; e++) head.insertCell().textContent = e;
  layer.experts.forEach((chosen, t) => {
    const tr = table.insertRow(); tr.insertCell().textContent = data.tokens[t];
    for (let e = 0; e < data.num_experts; e++) {
      const cell = tr.insertCell(), k = chosen.indexOf(e);
      if (k >= 0) { const w = layer.weights[t][k]; cell.textContent = w.toFixed(2);
        cell.style.background = `rgba(200, 60, 30, ${Math.min(1, w)})`; }
    }
  });
  routing.appendChild(table);
});
</script></body></html>
"""
