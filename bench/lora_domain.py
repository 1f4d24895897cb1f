"""Domain shift with LoRA: validation bits/byte of a base model on a new domain before, after LoRA (r=8, r=16) and
after a full fine-tune with the same data, steps and batch; trainable parameters in % of the base; adapter size.

    python bench/lora_domain.py BASE DATA --out runs/lora/domain [--steps 120] [--lora-lrs 1e-2 3e-2]
        [--full-lrs 1e-3 3e-3 1e-2] [--variants base lora_r8 ... full]

BASE is a checkpoint (e.g. the demo model, pretrained on Python source), DATA token shards of the new domain made
with the base's tokenizer (train and val splits). Every figure is measured on the same validation windows. Each
variant, the full fine-tune too (with the LoRA runs' Adam betas), runs at every lr given and is reported at its
best; each run's figures are kept in OUT/VARIANT/lr_LR/figures.json and read back by a later call (delete the folder
to measure it again). The output says what each variant is (LORA_VARIANTS below). `--paste-from FULL_CHECKPOINT`
measures instead where a full fine-tune's gain lives: the base with each part of its change pasted in
(`pasted_parts`, OUT/pasted.json).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from options import check_context, checkpoint_folder, learning_rate, non_negative_int, positive_int, token_shards

import seekstack
from seekstack.adapters.config import LORA_DEFAULTS, AdapterConfig
from seekstack.adapters.data import frequent_tokens
from seekstack.adapters.files import ADAPTER_WEIGHTS_FILE, apply_lora, is_adapter_parameter, load_adapter
from seekstack.adapters.training import lora_train_config, train_adapter
from seekstack.checkpoint import read_config
from seekstack.tokens.shards import TokenWindows, load_index
from seekstack.train.config import resolve_train_config
from seekstack.train.trainer import VAL_SPLIT, train

# LoRA variants measured: name -> (what it is, lora.FIELD and training overrides); alpha = 2r throughout. At
# vocabulary V and hidden D a rank-r pair on the embedding or the head costs r (V + D), the routed experts' E pairs of
# factors per layer dominate the count of the block targets, and on this small base (D = 128, V = 4096) only the
# head-only rank-8 variants and the `head_tokens` ones stay under 2% of the parameters.
BLOCKS_OFF = ["lora.attention=[]", "lora.feed_forward=[]", "lora.experts=[]"]
VOCAB_ONLY = [*BLOCKS_OFF, "lora.vocabulary=[embed_tokens,lm_head]"]
HEAD_ONLY = [*BLOCKS_OFF, "lora.vocabulary=[lm_head]"]
FIRST_FFN = ["lora.attention=[]", "lora.feed_forward=[gate_proj,up_proj]", "lora.experts=[]", "lora.layers=[0]"]
NO_WARMUP_NO_MTP = ["warmup_steps=0", "mtp_loss_weight=0", "mtp_loss_weight_late=0"]
BEST_RECIPE = ["lora.rank=8", "lora.alpha=16", *FIRST_FFN, "lora.head_tokens=311", *NO_WARMUP_NO_MTP]  # later wins
ROWS = [*BEST_RECIPE, "lora.head_tokens=161", "lora.embedding_tokens=150"]  # 150 of its rows on the embedding
EVERY_FFN = [*ROWS, "lora.layers=[]"]  # the factors on every layer's dense FFN or shared expert (gate, up)
ALL_FFN = "lora.feed_forward=[gate_proj,up_proj,down_proj]"
EVA = ["lora.init=eva", "lora.eva_rho=4"]
EVERY_FFN_EVA = [*EVERY_FFN, "lora.rank=2", "lora.alpha=4", *EVA]
HEAD_LORA = [*EVERY_FFN, "lora.rank=3", "lora.alpha=6", "lora.vocabulary=[lm_head]"]  # the head's rows: none below


def token_rows(head: int, embedding: int) -> list[str]:
    return [f"lora.head_tokens={head}", f"lora.embedding_tokens={embedding}"]


LORA_VARIANTS = {
    "lora_r8": ("rank 8 on attention, dense FFNs, shared and routed experts", ["lora.rank=8", "lora.alpha=16"]),
    "lora_r16": ("rank 16 on the same targets", ["lora.rank=16", "lora.alpha=32"]),
    "lora_r8_no_experts": ("rank 8 without the routed experts", ["lora.rank=8", "lora.alpha=16", "lora.experts=[]"]),
    "lora_r8_vocab": ("rank 8 on the token embedding and the head only", ["lora.rank=8", "lora.alpha=16", *VOCAB_ONLY]),
    "lora_r16_vocab": ("rank 16 on the embedding and the head only", ["lora.rank=16", "lora.alpha=32", *VOCAB_ONLY]),
    "lora_r8_head": ("rank 8 on the output head only", ["lora.rank=8", "lora.alpha=16", *HEAD_ONLY]),
    "lora_r8_head_rslora": (
        "rank 8 on the output head only, rsLoRA scale alpha/sqrt(r)",
        ["lora.rank=8", "lora.alpha=16", *HEAD_ONLY, "lora.rslora=true"],
    ),
    "lora_r8_all": (
        "rank 8 on every target, embedding and head too",
        ["lora.rank=8", "lora.alpha=16", "lora.vocabulary=[embed_tokens,lm_head]"],
    ),
    "lora_r16_all": (
        "rank 16 on every target",
        ["lora.rank=16", "lora.alpha=32", "lora.vocabulary=[embed_tokens,lm_head]"],
    ),
    "head_tokens336_att_r1": (
        "rank 1 on attention + the head rows of the 336 most frequent training tokens trained in full",
        ["lora.rank=1", "lora.alpha=2", "lora.feed_forward=[]", "lora.experts=[]", "lora.head_tokens=336"],
    ),
    # Where the full fine-tune's gain lives besides the vocabulary: its change of the first layer's dense FFN, on
    # top of its embedding + head change, adds 15 points (69% -> 84%), more than any other block's; its gate and up
    # projections read the token's embedding. Without warmup and without the MTP loss (the MTP module stays frozen
    # and unserved; its loss only pulls the shared head rows towards the token after next) each gains ~1 point.
    "head_tokens311_ffn0_r8": (
        "rank 8 on the first layer's dense FFN (gate, up) + the head rows of the 311 most frequent training "
        "tokens; no warmup, no MTP loss",
        BEST_RECIPE,
    ),
    # Changes of that best variant, each measured against it on seed 0. Where `--paste-from` puts the full
    # fine-tune's gain (layer 0's and layer 3's FFNs, 38.5% and 37.8% pasted alone): more FFN factors in place of
    # head rows; some rows moved to the token embedding (`embedding_tokens`, best at lr 7e-3: 150 of them gain 2
    # points over 3 seeds, 85.5% against 83.5%, within one seed's spread); alpha x2 and /2. Head rows picked by the
    # L1 loss gradient at the base instead of frequency (121 of them then are old-domain tokens the base
    # over-predicts) lost 19 points and were dropped.
    "head_tokens283_ffn03_r8": (
        "head_tokens311_ffn0_r8 with rank 8 on layer 3's shared expert (gate, up) too, 283 head rows",
        [*BEST_RECIPE, "lora.layers=[0,3]", "lora.head_tokens=283"],
    ),
    "head_tokens279_ffn0all_r8": (
        "head_tokens311_ffn0_r8 with rank 8 on layer 0's down projection too, 279 head rows",
        [*BEST_RECIPE, "lora.feed_forward=[gate_proj,up_proj,down_proj]", "lora.head_tokens=279"],
    ),
    "head_tokens256_embedding55_ffn0_r8": (
        "head_tokens311_ffn0_r8 with 55 of its rows moved to the token embedding",
        [*BEST_RECIPE, "lora.head_tokens=256", "lora.embedding_tokens=55"],
    ),
    "head_tokens211_embedding100_ffn0_r8": (
        "head_tokens311_ffn0_r8 with 100 of its rows moved to the token embedding",
        [*BEST_RECIPE, "lora.head_tokens=211", "lora.embedding_tokens=100"],
    ),
    "head_tokens161_embedding150_ffn0_r8": (
        "head_tokens311_ffn0_r8 with 150 of its rows moved to the token embedding",
        ROWS,
    ),
    # Data-driven starts (config.py, `init=eva`): EVA's A = the top singular vectors of each adapted layer's inputs
    # on the run's first training batches; with eva_rho > 1 the layers' ranks move by their inputs' explained
    # variance at the same total (here from layer 0 to the shared experts). On layer 0's FFN alone EVA changes
    # nothing (86.0% vs 86.1%, seed 0), but it makes small ranks spread over every layer's FFN pay: rank 2 on every
    # dense FFN / shared expert (gate, up) 87.3% over 3 seeds against 85.5% from the plain start at the same ranks;
    # rank 3 88.2% (5 seeds: 86.7%, plain start 85.3%, head_tokens161_embedding150_ffn0_r8 85.0%); the down
    # projections too: rank 2 88.0%, rank 3 with 291 rows 88.2% (5 seeds 87.0%); rank 4 and more rows were no
    # better on seed 0. CorDA's start (peft's preprocess_corda, instruction-previewed: B A = the top
    # part of W C, C the inputs' covariance, on the residual base, saved at rank 2r) at rank 4 on layer 0's FFN lost
    # (82.5%, seed 0) and was dropped.
    "head_tokens161_embedding150_ffn0_r8_eva": (
        "head_tokens161_embedding150_ffn0_r8 with EVA's start (A from the SVD of the FFN's inputs)",
        [*ROWS, "lora.init=eva"],
    ),
    "head_tokens161_embedding150_ffn_r2_eva_rho4": (
        "head_tokens161_embedding150_ffn0_r8 with rank 2 on every layer's dense FFN or shared expert (gate, up) "
        "instead, from EVA's start (their 16 ranks may move)",
        EVERY_FFN_EVA,
    ),
    "head_tokens161_embedding150_ffn03_r4_eva_rho2": (
        "head_tokens161_embedding150_ffn0_r8 with rank 4 on layer 0's FFN and layer 3's shared expert (gate, up), "
        "EVA moving their 16 ranks",
        [*ROWS, "lora.layers=[0,3]", "lora.rank=4", "lora.alpha=8", *EVA, "lora.eva_rho=2"],
    ),
    "head_tokens161_embedding150_ffn03_r4": (
        "the same targets at rank 4 each from the plain start (no EVA: the control of the one above)",
        [*ROWS, "lora.layers=[0,3]", "lora.rank=4", "lora.alpha=8"],
    ),
    "head_tokens161_embedding150_ffn_r2": (
        "rank 2 on every layer's dense FFN or shared expert (gate, up) from the plain start (the control of EVA's)",
        [*EVERY_FFN, "lora.rank=2", "lora.alpha=4"],
    ),
    "head_tokens161_embedding150_ffn_r2_eva_rho4_warmup6": (
        "head_tokens161_embedding150_ffn_r2_eva_rho4 with 6 warmup steps",
        [*EVERY_FFN_EVA, "warmup_steps=6"],
    ),
    "head_tokens175_embedding163_ffn_r2_eva_rho4": (
        "head_tokens161_embedding150_ffn_r2_eva_rho4 with the budget's rest on 27 more rows (14 head, 13 embedding)",
        [*EVERY_FFN_EVA, "lora.head_tokens=175", "lora.embedding_tokens=163"],
    ),
    "head_tokens161_embedding150_ffn_r3_eva_rho4": (
        "head_tokens161_embedding150_ffn_r2_eva_rho4 at rank 3",
        [*EVERY_FFN_EVA, "lora.rank=3", "lora.alpha=6"],
    ),
    "head_tokens161_embedding150_ffn_r3": (
        "head_tokens161_embedding150_ffn_r3_eva_rho4 from the plain start (the control of EVA's)",
        [*EVERY_FFN, "lora.rank=3", "lora.alpha=6"],
    ),
    "head_tokens155_embedding145_ffn_r4_eva_rho4": (
        "head_tokens161_embedding150_ffn_r2_eva_rho4 at rank 4, 11 fewer rows",
        [*EVERY_FFN_EVA, "lora.rank=4", "lora.alpha=8", "lora.head_tokens=155", "lora.embedding_tokens=145"],
    ),
    "head_tokens161_embedding150_ffnall_r2_eva_rho4": (
        "head_tokens161_embedding150_ffn_r2_eva_rho4 with the down projections too",
        [*EVERY_FFN_EVA, ALL_FFN],
    ),
    "head_tokens151_embedding140_ffnall_r3_eva_rho4": (
        "head_tokens161_embedding150_ffnall_r2_eva_rho4 at rank 3, 20 fewer rows",
        [*EVERY_FFN_EVA, ALL_FFN, "lora.rank=3", "lora.alpha=6", "lora.head_tokens=151", "lora.embedding_tokens=140"],
    ),
    "head_tokens151_embedding140_ffnall_r3_eva": (
        "head_tokens151_embedding140_ffnall_r3_eva_rho4 without moving ranks (eva_rho 1)",
        [
            *EVERY_FFN,
            ALL_FFN,
            "lora.rank=3",
            "lora.alpha=6",
            "lora.head_tokens=151",
            "lora.embedding_tokens=140",
            "lora.init=eva",
        ],
    ),
    "head_tokens151_embedding140_ffnall_r3": (
        "head_tokens151_embedding140_ffnall_r3_eva_rho4 from the plain start (the control of EVA's)",
        [*EVERY_FFN, ALL_FFN, "lora.rank=3", "lora.alpha=6", "lora.head_tokens=151", "lora.embedding_tokens=140"],
    ),
    "head_tokens137_embedding127_ffnall_r4_eva_rho4": (
        "head_tokens161_embedding150_ffnall_r2_eva_rho4 at rank 4, 47 fewer rows",
        [*EVERY_FFN_EVA, ALL_FFN, "lora.rank=4", "lora.alpha=8", "lora.head_tokens=137", "lora.embedding_tokens=127"],
    ),
    # Changes of head_tokens161_embedding150_ffn_r3_eva_rho4 that did not pay (lq4; seed 0 unless said, lr 1e-2):
    # EVA on MLA's down-projections (q_a, kv_a) beside the FFN factors, rows cut to stay under 2%: rank 3 with 270 rows
    # 88.3% but 86.5% over 3 seeds (88.3 / 86.2 / 84.9), rank 2 87.5%, the down projections too 87.6%; every attention
    # projection (rank 2, 250 rows) 86.8%; eva_rho 2 or 8 (the same ranks as 4) 88.1%; EVA's A from 32 or 60 start
    # batches instead of 16 (a field since removed): the same run bit for bit (EVA's PCA settles within 16); Adam's
    # beta2 0.99 88.3%; lr 7e-3 / 1.5e-2 87.8% / 86.8% (lq3).
    # A low-rank head update instead of head rows (lq4). The full fine-tune's head change pasted into the base gives
    # 12.0% of its gain on the 161 most frequent tokens' rows (12.8% on 311) but 17.8% with the rank-1 part of its
    # change on the other rows: the rows outside the head_tokens move together, which rows cannot do (peft refuses
    # trainable_token_indices on a LoRA layer, so the head gets one or the other). Rank 3 on the head beside rank 3
    # on every FFN (gate, up) and 215 embedding rows recovers 90.1% over 3 seeds (90.3 / 89.4 / 90.5), 89.1% over 5
    # (+ 87.3 / 88.0) and 88.6% over 9 (+ 86.5 / 87.6 / 87.1 / 91.4), against 88.2% / 86.7% / 87.2% for
    # head_tokens161_embedding150_ffn_r3_eva_rho4 (better on 8 of the 9 seeds, paired mean +1.4 points); on the val
    # windows it closes the gap on the targets ranked 161-1000 by frequency and loses some on the rarest.
    # Seed 0: lr 7e-3 / 1.5e-2 89.1% / 89.6%; rank 2 / 4 (rows to fit) 87.7% / 89.0%; the down projections too 89.4%;
    # the FFN factors on layer 0 only 85.1%; a LoRA on the embedding instead of its rows 70.1%; alpha 24 88.1%,
    # alpha 12 the same as 6 over 3 seeds (90.4 / 89.7 / 90.2). With init=eva (a config.py change since reverted:
    # init=eva refuses a vocabulary LoRA): EVA on the FFN factors beside a plain head LoRA 89.0%, EVA on the head
    # too (eva_rho 1) 88.8% over 3 seeds (89.6 / 88.4 / 88.3).
    "embedding215_head_r3_ffn_r3": (
        "rank 3 on the output head and on every dense FFN / shared expert (gate, up), 215 embedding rows, no head rows",
        [*HEAD_LORA, *token_rows(0, 215)],
    ),
    # Changes of embedding215_head_r3_ffn_r3 that did not pay (lq5; share of the full fine-tune's gain on seed 0 unless
    # said, against the recipe's 90.3%; 90.3 / 89.4 / 90.5 on seeds 0-2, 88.6% over 0-8). Per-group learning rates
    # (temporary AdapterConfig fields giving each group the `lr_scale` the trainer's optimizer groups read; removed),
    # x the run's 1e-2: the embedding rows x0.3 / x0.5 / x2 89.8% / 89.9% / 89.0% (they move ~8x as far as the full
    # fine-tune's rows at lr 1e-3, as far as the base rows' own spread), the head factors x0.5 / x2 90.2% / 89.1%, the
    # FFN factors x0.5 / x2 (lr 5e-3 / 2e-2, the rows and head kept at 1e-2) 89.0% / 89.0%. The budget split with the
    # head's own rank (a temporary field, head alpha/r 2; a head rank costs V + D = 4224 parameters, 33 rows, an FFN
    # rank on every layer's gate/up 2368, 18.5 rows): head r4 / FFN r3 / 182 rows 89.2%, head r2 / r3 / 248 rows
    # 89.2%, r3 / FFN r4 / 196 rows 89.8%, r3 / FFN r2 / 233 rows 90.0%; no FFN factors on layer 0, 239 rows 89.5%.
    # The recipe's lr 8e-3 / 1.2e-2 over seeds 0-2: 89.5% / 89.9% (1e-2: 90.1%). The settings below: gradient clipping
    # at 2 89.8% over seeds 0-2 (90.9 / 89.0 / 89.4), at 4 90.2%, none 89.0%; LoRA+ x2 88.8% over seeds 0-8 (paired
    # +0.2 points: 90.8 / 89.7 / 89.9 / 86.9 / 87.8 / 88.0 / 87.6 / 87.6 / 91.5), x4 88.4%; beta2 0.99 90.4%, 0.999
    # 88.7% over seeds 0-8 (paired +0.06); min_lr 5e-4 / 2e-3 89.9% / 90.2%; WSD decaying over the last 30% / 60%
    # 89.1% / 89.4%. Each within a seed's noise of the recipe or below it.
    # On the base re-trained later (the recipe 86.4 / 87.7 / 87.7% on seeds 0-2, 87.5% over 0-8), with a temporary
    # patch that trained and saved extra base tensors beside the adapter, rows cut to keep the budget: every RMSNorm
    # weight (1,536 parameters, 12 fewer rows) 86.7 / 88.0 / 88.05% (+0.3 on each seed: too little to be worth norms
    # in the adapter format and per-row serving), the MoE routers' weights (24 fewer rows) 84.9 / 85.1 / 87.4%, both
    # 85.1% on seed 0; rank 3 on the routed experts too (3.6% trainable) 87.6% on seed 0. Where a full fine-tune's
    # change pasted into this base gains (`--paste-from`): embedding + head 40.7%, the blocks 70.9%, layer 0's FFN
    # 39.3% (its gate and up 25.3%), layer 3's MoE 28.6%, each attention 6-13%, the norms 0.8%.
    # Adam's beta1 (lq6), on a third `make demo` base (base 2.6589 bits/byte on the prose; the full fine-tune gains
    # 0.16-0.21, a third of the earlier bases' gain, and the recipe recovers 62.4% of it over seeds 0-2): beta1 0.9 /
    # 0.8 / 0.7 / 0.5 / 0.3 / 0 recover 63.7 / 70.6 / 73.5 / 74.7 / 74.0 / 73.6% on seed 0; beta1 0.5 74.7% over
    # seeds 0-8 (71.9-78.2) against 64.6% at 0.9 (paired +10.1 points, 5.3-15.1, better on all nine), the LoRA
    # default since (adapters/config.py's LORA_BETAS; `_beta1_0.9` below is the recipe at 0.9). The full fine-tune
    # gains more at beta1 0.5 too (3-12%, seeds 0-4; at 0.8 5%, seed 0) and trains with the LoRA's betas since
    # (full_fine_tune_settings): against it the recipe at beta1 0.5 recovers 69.9% over seeds 0-4 (65.1-75.1), at 0.9
    # 60.5%.
    **{
        f"embedding215_head_r3_ffn_r3_{name}": (
            f"embedding215_head_r3_ffn_r3 with {override}",
            [*HEAD_LORA, *token_rows(0, 215), *override.split()],
        )
        for name, override in (
            ("beta1_0.9", "betas=[0.9,0.95]"),
            ("beta2_0.99", "betas=[0.9,0.99]"),
            ("beta2_0.999", "betas=[0.9,0.999]"),
            ("minlr5e-4", "min_lr=5e-4"),
            ("minlr2e-3", "min_lr=2e-3"),
            ("clip2", "grad_clip=2"),
            ("clip4", "grad_clip=4"),
            ("noclip", "grad_clip=0"),
            ("loraplus2", "lora.loraplus_ratio=2"),
            ("loraplus4", "lora.loraplus_ratio=4"),
            ("wsd30", "schedule=wsd wsd_decay_fraction=0.3"),
            ("wsd60", "schedule=wsd wsd_decay_fraction=0.6"),
        )
    },
    "embedding239_head_r3_ffn123_r3": (
        "embedding215_head_r3_ffn_r3 without layer 0's dense FFN factors, 24 more embedding rows",
        [*HEAD_LORA, "lora.layers=[1,2,3]", *token_rows(0, 239)],
    ),
    "embedding265_head_r2_ffn_r2": (
        "embedding215_head_r3_ffn_r3 at rank 2, 50 more embedding rows",
        [*HEAD_LORA, "lora.rank=2", "lora.alpha=4", *token_rows(0, 265)],
    ),
    "embedding165_head_r4_ffn_r4": (
        "embedding215_head_r3_ffn_r3 at rank 4, 50 fewer embedding rows",
        [*HEAD_LORA, "lora.rank=4", "lora.alpha=8", *token_rows(0, 165)],
    ),
    "embedding187_head_r3_ffnall_r3": (
        "embedding215_head_r3_ffn_r3 with the down projections too, 28 fewer embedding rows",
        [*HEAD_LORA, ALL_FFN, *token_rows(0, 187)],
    ),
    # On the third base at beta1 0.5 (lq7): the down projections too, at the same rank, 192 rows (1.995%), recover
    # 71.3% over seeds 0-8 of the full fine-tune's gain at the same betas (64.6-74.5; the recipe 69.8%, 65.1-75.1):
    # paired +1.5 points (-1.7 to +4.7), better on 7 of 9 seeds; against the full fine-tune at beta1 0.9 76.3% (the
    # recipe 74.7%). The blocks hold more of the gain on this base than on the earlier ones (`--paste-from`, seed 0).
    # Around it, seed 0 (71.2%): rank 2 with 252 rows 69.0%, rank 4 with 132 rows 69.4%. Of the recipe at beta1 0.5,
    # seed 0 (68.5%): lr 7e-3 / 1.5e-2 67.6% / 65.3%, LoRA+ x2 66.3%, rsLoRA 68.2%.
    "embedding192_head_r3_ffnall_r3": (
        "embedding215_head_r3_ffn_r3 with the down projections too, 23 fewer embedding rows (1.995%)",
        [*HEAD_LORA, ALL_FFN, *token_rows(0, 192)],
    ),
    "embedding250_head_r3_ffn0_r3": (
        "embedding215_head_r3_ffn_r3 with the FFN factors on layer 0 only, 35 more embedding rows",
        [*HEAD_LORA, "lora.layers=[0]", *token_rows(0, 250)],
    ),
    "vocabulary_r4_ffn_r4": (
        "rank 4 on the token embedding, the output head and every dense FFN / shared expert (gate, up), no rows",
        [*HEAD_LORA, "lora.rank=4", "lora.alpha=8", "lora.vocabulary=[embed_tokens,lm_head]", *token_rows(0, 0)],
    ),
    # The adapter's own schedule at the same steps and data (the full fine-tune's stays), seed 0 unless said: the lr
    # decayed to 0 (83.9%) or held (84.8%), 6 warmup steps (87.0% on seed 0 at lr 1e-2, but 86.4% over 3 seeds:
    # 83.3% on seed 2; with EVA's recipe 86.2%), weight decay 0.1 (85.9%; it pulls the trained rows towards 0, not
    # to the base's), no gradient clipping (86.1%): none beats the cosine to lr/10 without warmup.
    "head_tokens161_embedding150_ffn0_r8_minlr0": (
        "head_tokens161_embedding150_ffn0_r8 with its cosine decaying to 0 instead of lr/10",
        [*ROWS, "min_lr=0"],
    ),
    "head_tokens161_embedding150_ffn0_r8_constant": (
        "head_tokens161_embedding150_ffn0_r8 at a constant lr (wsd without its decay)",
        [*ROWS, "schedule=wsd", "wsd_decay_fraction=0"],
    ),
    "head_tokens161_embedding150_ffn0_r8_warmup6": (
        "head_tokens161_embedding150_ffn0_r8 with 6 warmup steps",
        [*ROWS, "warmup_steps=6"],
    ),
    "head_tokens161_embedding150_ffn0_r8_wd01": (
        "head_tokens161_embedding150_ffn0_r8 with weight decay 0.1",
        [*ROWS, "weight_decay=0.1"],
    ),
    "head_tokens161_embedding150_ffn0_r8_noclip": (
        "head_tokens161_embedding150_ffn0_r8 without gradient clipping",
        [*ROWS, "grad_clip=0"],
    ),
    "head_tokens111_embedding200_ffn0_r8": (
        "head_tokens311_ffn0_r8 with 200 of its rows moved to the token embedding",
        [*BEST_RECIPE, "lora.head_tokens=111", "lora.embedding_tokens=200"],
    ),
    "head_tokens61_embedding250_ffn0_r8": (
        "head_tokens311_ffn0_r8 with 250 of its rows moved to the token embedding",
        [*BEST_RECIPE, "lora.head_tokens=61", "lora.embedding_tokens=250"],
    ),
    "embedding311_ffn0_r8": (
        "head_tokens311_ffn0_r8 with all of its rows moved to the token embedding",
        [*BEST_RECIPE, "lora.head_tokens=0", "lora.embedding_tokens=311"],
    ),
    "head_tokens311_ffn0_r8_alpha32": (
        "head_tokens311_ffn0_r8 with alpha 32 (the factors' update scaled by 4)",
        [*BEST_RECIPE, "lora.alpha=32"],
    ),
    "head_tokens311_ffn0_r8_alpha8": (
        "head_tokens311_ffn0_r8 with alpha 8 (the factors' update scaled by 1)",
        [*BEST_RECIPE, "lora.alpha=8"],
    ),
    # peft's other LoRA recipes on that best variant (config.py): PiSSA / OLoRA start B A from W's SVD / QR (saved
    # as plain LoRA of rank 2r on the original base: the file holds 2r, trained_percent counts the r trained),
    # LoRA+ trains B at 16x A's lr. DoRA is refused on parameter targets (the FFN) and on the fused head, so it
    # goes on the attention variant, with 22 fewer head rows paying for its magnitude vectors.
    "head_tokens311_ffn0_r8_pissa": (
        "head_tokens311_ffn0_r8 with PiSSA's start (B A = W's top-8 singular part, trained on the residual)",
        ["lora.rank=8", "lora.alpha=16", *FIRST_FFN, "lora.head_tokens=311", *NO_WARMUP_NO_MTP, "lora.init=pissa"],
    ),
    "head_tokens311_ffn0_r4_pissa": (
        "the same at rank 4, whose saved rank-8 adapter stays under 2%",
        ["lora.rank=4", "lora.alpha=8", *FIRST_FFN, "lora.head_tokens=311", *NO_WARMUP_NO_MTP, "lora.init=pissa"],
    ),
    "head_tokens311_ffn0_r8_olora": (
        "head_tokens311_ffn0_r8 with OLoRA's start (B A from W's QR decomposition)",
        ["lora.rank=8", "lora.alpha=16", *FIRST_FFN, "lora.head_tokens=311", *NO_WARMUP_NO_MTP, "lora.init=olora"],
    ),
    "head_tokens311_ffn0_r8_loraplus": (
        "head_tokens311_ffn0_r8 with LoRA+ (B's lr 16x A's)",
        [
            "lora.rank=8",
            "lora.alpha=16",
            *FIRST_FFN,
            "lora.head_tokens=311",
            *NO_WARMUP_NO_MTP,
            "lora.loraplus_ratio=16",
        ],
    ),
    "head_tokens314_att_r1_dora": (
        "head_tokens336_att_r1 with DoRA (a magnitude per output row of each attention projection), 314 head rows",
        ["lora.rank=1", "lora.alpha=2", *BLOCKS_OFF[1:], "lora.head_tokens=314", "lora.dora=true"],
    ),
}


@torch.no_grad()
def val_bits_per_byte(model: torch.nn.Module, data: Path, seq_len: int, batch_size: int, batches: int) -> float:
    """Next-token loss over the first `batches` batches of the val split (as the trainer evaluates it; 0 = all) in
    bits per UTF-8 byte, with the split's tokens per byte."""
    model.eval()
    loss_sum, targets = 0.0, 0
    for number, batch in enumerate(TokenWindows(data, VAL_SPLIT, seq_len).sequential(batch_size)):
        if number == batches:
            break
        out = model(batch, labels=batch, keep_logits=False)
        count = batch.shape[0] * (batch.shape[1] - 1)
        loss_sum, targets = loss_sum + out.lm_loss.item() * count, targets + count
    index = load_index(data, VAL_SPLIT)
    return loss_sum / targets * index["total_tokens"] / (math.log(2) * index["text_bytes"])


# Parts of a full fine-tune's change (`--paste-from`), as regular expressions over parameter names: each is pasted
# into the base to show where the fine-tune's gain lives; the blocks' parts alone and beside the embedding + head.
VOCABULARY_PART = r"^(embed_tokens|lm_head)\."
BLOCK_PARTS = {"attention": "self_attn", "FFN": "mlp", "FFN gate, up": r"mlp\.(gate|up)_proj"}


def pasted_parts(base: torch.nn.Module, tuned: torch.nn.Module, measure: dict) -> dict[str, float]:
    """Validation bits/byte of the base with each part of `tuned`'s weights (that the base has) pasted in."""
    parts = {
        "embedding": r"^embed_tokens\.",
        "head": r"^lm_head\.",
        "embedding + head": VOCABULARY_PART,
        "norms": r"^(?!mtp\.).*norm\.weight$",
        "blocks": r"^layers\.",
        "main model": r"^(?!mtp\.)",
    }
    original = {key: value.clone() for key, value in base.state_dict().items()}
    for layer in range(base.config.num_hidden_layers):
        for part, name in BLOCK_PARTS.items():
            pattern = rf"^layers\.{layer}\.{name}\."
            if any(re.search(pattern, key) for key in original):  # (a dense FFN's gate and up: not in MoE layers)
                parts[f"layer {layer} {part}"] = pattern
                parts[f"embedding + head + layer {layer} {part}"] = f"{VOCABULARY_PART}|{pattern}"
    changed = tuned.state_dict()
    figures = {}
    for part, pattern in parts.items():
        base.load_state_dict(
            {key: changed[key] if re.search(pattern, key) else value for key, value in original.items()}
        )
        figures[part] = val_bits_per_byte(base, **measure)
    base.load_state_dict(original)
    return figures


def full_fine_tune_settings(lr: float) -> list[str]:
    """The full fine-tune's training overrides at `lr`: the LoRA runs' Adam betas, so that the two differ in what
    they train (and in the schedule each has at its best), not in the optimizer. At pretraining's beta1 0.9 it gains
    9% less (seed 0), which inflated every adapter's share of its gain."""
    shared = [
        setting for setting in LORA_DEFAULTS if setting.split("=")[0] in ("weight_decay", "bias_update_rate", "betas")
    ]
    return [f"lr={lr}", f"min_lr={lr / 10}", *shared]


def measured(folder: Path, measure: Callable[[], dict]) -> dict:
    """The figures of one run: read back from `folder`/figures.json when that run was measured already."""
    path = folder / "figures.json"
    if not path.is_file():
        figures = measure()
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=checkpoint_folder)
    parser.add_argument("data", type=token_shards("train"))
    parser.add_argument("--out", type=Path, default=Path("runs/lora/domain"))
    parser.add_argument("--steps", type=positive_int, default=120)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument(
        "--lora-lrs", type=learning_rate, nargs="+", default=[1e-2, 3e-2], help="each LoRA variant's lrs"
    )
    parser.add_argument(
        "--full-lrs", type=learning_rate, nargs="+", default=[1e-3, 3e-3, 1e-2], help="the full fine-tune's"
    )
    parser.add_argument("--eval-batches", type=non_negative_int, default=0, help="validation batches measured; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="training seed (a new --out per seed: runs are cached)")
    parser.add_argument("--variants", nargs="+", default=["base", *LORA_VARIANTS, "full"], help="what to measure")
    parser.add_argument(
        "--paste-from",
        type=Path,
        help="a full fine-tune's checkpoint: measure the base with parts of its change instead",
    )
    args = parser.parse_args()
    context = read_config(args.base).max_position_embeddings
    check_context(parser, "--seq-len", args.seq_len, context, f"{args.base}'s")
    run = [
        f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", "eval_every=0",
        f"save_every={args.steps}", "keep_checkpoints=1", "warmup_steps=10", f"seed={args.seed}",
    ]  # fmt: skip
    measure = dict(data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, batches=args.eval_batches)
    base_model = seekstack.load_pretrained(args.base)
    # The share of the main model (without the MTP module, which inference does not run and LoRA does not adapt).
    main_params = sum(p.numel() for name, p in base_model.named_parameters() if not name.startswith("mtp."))
    if args.paste_from:
        base_bpb = val_bits_per_byte(base_model, **measure)
        pasted = pasted_parts(base_model, seekstack.load_pretrained(args.paste_from), measure)
        gain = base_bpb - pasted["main model"]  # the fine-tune's own gain (its MTP module is not evaluated)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pasted.json").write_text(json.dumps({"base": base_bpb, **pasted}, indent=2) + "\n")
        for name, bpb in pasted.items():
            print(f"{name:<40} {bpb:.4f} bits/byte, {(base_bpb - bpb) / gain:6.1%} of the fine-tune's gain")
        return

    def lora_run(variant: str, lr: float) -> dict:
        out = args.out / variant / f"lr_{lr:g}"
        train_adapter(
            *lora_train_config(
                args.base, args.data, out, [*run, f"lr={lr}", f"min_lr={lr / 10}", *LORA_VARIANTS[variant][1]]
            )
        )
        tuned = load_adapter(seekstack.load_pretrained(args.base), out)
        trainable = sum(p.numel() for name, p in tuned.named_parameters() if is_adapter_parameter(name))
        adapter = AdapterConfig.load(out)
        rows = frequent_tokens(args.data, max(adapter.head_tokens, adapter.embedding_tokens))  # (counted only)
        head_rows, embedding_rows = rows[: adapter.head_tokens], rows[: adapter.embedding_tokens]
        trained = trainable
        if adapter.init in ("pissa", "olora"):  # saved at rank 2r on the original base, r of them trained
            plain = apply_lora(
                seekstack.load_pretrained(args.base), replace(adapter, init="lora"), "", head_rows, embedding_rows
            )
            trained = sum(p.numel() for p in plain.parameters() if p.requires_grad)
        return {
            "val_bpb": val_bits_per_byte(tuned, **measure),
            "trainable_percent": 100 * trainable / main_params,  # of the saved adapter
            "trained_percent": 100 * trained / main_params,
            "adapter_bytes": (out / ADAPTER_WEIGHTS_FILE).stat().st_size,
        }

    def full_run(lr: float) -> dict:
        full = [*run, *full_fine_tune_settings(lr)]
        paths = [f"init_from={args.base}", f"data_dir={args.data}", f"out_dir={args.out / 'full' / f'lr_{lr:g}'}"]
        result = train(resolve_train_config(None, [*full, *paths]))
        return {
            "val_bpb": val_bits_per_byte(seekstack.load_pretrained(result.checkpoint), **measure),
            "trainable_percent": 100.0,
            "checkpoint_bytes": (result.checkpoint / "model.safetensors").stat().st_size,
        }

    results: dict[str, dict] = {}
    if "base" in args.variants:
        results["base"] = measured(args.out / "base", lambda: {"val_bpb": val_bits_per_byte(base_model, **measure)})
    sweeps = {variant: args.lora_lrs for variant in args.variants if variant in LORA_VARIANTS}
    if "full" in args.variants:
        sweeps["full"] = args.full_lrs
    for variant, lrs in sweeps.items():
        by_lr = {
            lr: measured(
                args.out / variant / f"lr_{lr:g}",
                lambda variant=variant, lr=lr: full_run(lr) if variant == "full" else lora_run(variant, lr),
            )
            for lr in lrs
        }
        best = min(by_lr, key=lambda lr: by_lr[lr]["val_bpb"])  # each row at its own best lr, the baseline too
        results[variant] = {
            **by_lr[best],
            "lr": best,
            "val_bpb_by_lr": {f"{lr:g}": f["val_bpb"] for lr, f in by_lr.items()},
        }
    if "base" in results and "full" in results:
        gain_full = results["base"]["val_bpb"] - results["full"]["val_bpb"]
        for variant in (v for v in results if v in LORA_VARIANTS):
            gain = results["base"]["val_bpb"] - results[variant]["val_bpb"]
            results[variant]["recovered_of_full_gain"] = gain / gain_full
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    described = {"base": "the base model, no adaptation", "full": "full fine-tune: every parameter, MTP included"}
    described |= {name: description for name, (description, _) in LORA_VARIANTS.items()}
    for name, figures in results.items():
        print(f"{name:<22} {described[name]}\n{'':<22} {json.dumps(figures)}")


if __name__ == "__main__":
    main()
