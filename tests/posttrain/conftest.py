from pathlib import Path

import pytest
import torch

from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.sft import run_sft
from seekstack.train.config import resolve_train_config
from tests.posttrain.support import micro_checkpoint


@pytest.fixture
def step_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Each AdamW step's gradients, every parameter's, recorded as the step is taken (one list per step)."""
    gradients: list[list[torch.Tensor]] = []
    step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        gradients.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return gradients


@pytest.fixture(autouse=True)
def _one_thread():
    """Post-training tests run many tiny ops, which a second thread only slows on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_micro_model(root: Path, steps: int) -> Path:
    """The micro model after `steps` of SFT on 1-digit addition traces, as a checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = micro_checkpoint(root / "start")
    config = [f"init_from={start}", f"out_dir={root / 'run'}", "task=addition", "difficulty=1", "examples=64"]
    config += [f"max_steps={steps}", "batch_size=8", "lr=1e-2", "warmup_steps=0", "seq_len=128"]
    checkpoint = run_sft(resolve_train_config(None, config, cls=SFTConfig)).checkpoint
    torch.set_num_threads(threads)
    return checkpoint


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """After a short SFT: its samples are sometimes well formed, so rewards vary within groups and GRPO has
    gradients."""
    return sft_micro_model(tmp_path_factory.mktemp("sft"), steps=40)


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory) -> Path:
    """After a longer SFT: about one sample in seven answers right, so rejection sampling keeps some and drops most."""
    return sft_micro_model(tmp_path_factory.mktemp("teacher"), steps=150)
