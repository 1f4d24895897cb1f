"""bench/serve_json_mode.py's mask timing walks a valid document through JSON mode's constraint."""

import sys

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench.serve_json_mode import mask_costs, synthetic_tokenizer  # noqa: E402


def test_the_mask_timing_walks_the_whole_document_in_the_layout_json_mode_writes():
    """The document was indented (json.dumps(indent=2)), and JSON mode writes json.dumps' compact layout alone: every
    run ended 'the mask refused token 2503 ('\\n ') of a valid document' before timing anything."""
    costs = mask_costs(synthetic_tokenizer(300))
    assert costs["tokens"] > 100 and 0 < costs["p50_us"] <= costs["p95_us"] <= costs["max_us"]
