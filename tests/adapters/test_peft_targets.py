"""peft_targets: what a peft LoraConfig adapts, read on transformers' names, and the warnings it keeps quiet."""

from __future__ import annotations

import threading
import warnings

import peft

from seekstack.adapters import peft_targets
from seekstack.config import preset


def test_two_adapter_loads_at_once_leave_the_warning_filters_as_they_were(monkeypatch):
    """One load inside config_for_seekstack's ignore-everything while another starts quiet_parameter_patterns (a
    server's concurrent adapter loads): was, the second restored the first's "ignore" for the whole process."""
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    get_peft_model = peft.get_peft_model

    def get_peft_model_meeting_the_second_load(*args, **kwargs):
        model = get_peft_model(*args, **kwargs)
        first_inside.set()
        second_inside.wait(timeout=1)  # it never comes in while this load holds the filters
        return model

    def first_load():
        try:
            peft_targets.config_for_seekstack(peft.LoraConfig(r=2, target_modules=["kv_b_proj"]), preset("tiny"))
        finally:
            first_inside.set()
            first_done.set()

    def second_load():
        first_inside.wait(timeout=10)
        with peft_targets.quiet_parameter_patterns():
            second_inside.set()
            first_done.wait(timeout=10)

    monkeypatch.setattr(peft, "get_peft_model", get_peft_model_meeting_the_second_load)
    filters = list(warnings.filters)
    loads = [threading.Thread(target=first_load), threading.Thread(target=second_load)]
    for load in loads:
        load.start()
    for load in loads:
        load.join(timeout=30)
    assert warnings.filters == filters
