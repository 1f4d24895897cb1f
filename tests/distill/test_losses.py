"""The distillation losses against hand-computed references, TRL's GKD loss, and the masks and shapes around them."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from seekstack.config import ConfigError
from seekstack.distill.features import FeatureProjections
from seekstack.distill.losses import feature_distance, generalized_jsd, logit_distillation
from seekstack.distill.onpolicy import on_policy_targets
from seekstack.distill.teacher import TopKCache
from seekstack.model.head_loss import IGNORE_INDEX

STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
TEACHER = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in logits.tolist():
        total = sum(math.exp(v) for v in row)
        rows.append([math.exp(v) / total for v in row])
    return rows


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_forward_and_reverse_kl_match_hand_computed_sums():
    s, t = softmax_rows(STUDENT), softmax_rows(TEACHER)
    forward = sum(kl_by_hand(t[i], s[i]) for i in range(2)) / 2
    reverse = sum(kl_by_hand(s[i], t[i]) for i in range(2)) / 2
    assert generalized_jsd(STUDENT, TEACHER, beta=0.0).item() == pytest.approx(forward, rel=1e-5)
    assert generalized_jsd(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-2)


def test_generalized_jsd_matches_the_hand_computed_mixture():
    beta = 0.3
    s, t = softmax_rows(STUDENT), softmax_rows(TEACHER)
    expected = 0.0
    for i in range(2):
        mixture = [beta * ti + (1 - beta) * si for si, ti in zip(s[i], t[i], strict=True)]
        expected += beta * kl_by_hand(t[i], mixture) + (1 - beta) * kl_by_hand(s[i], mixture)
    assert generalized_jsd(STUDENT, TEACHER, beta=beta).item() == pytest.approx(expected / 2, rel=1e-5)


def test_logit_distillation_is_the_softened_divergence_scaled_by_t_squared():
    temperature = 2.0
    s, t = softmax_rows(STUDENT / temperature), softmax_rows(TEACHER / temperature)
    softened_forward = sum(kl_by_hand(t[i], s[i]) for i in range(2)) / 2
    scaled = logit_distillation(STUDENT, TEACHER, beta=0.0, temperature=temperature).item()
    assert scaled == pytest.approx(4 * softened_forward, rel=1e-5)
    assert generalized_jsd(STUDENT, TEACHER, 0.0, temperature).item() == pytest.approx(softened_forward, rel=1e-5)


def trl_generalized_jsd_loss():
    """TRL's `GKDTrainer.generalized_jsd_loss`, its source read from the installed trl (importing its trainer
    module pulls in transformers, datasets and accelerate: tens of seconds); skipped without trl."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    source = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    trainer = next(
        n for n in ast.parse(source.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer"
    )
    function = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss")
    function.decorator_list = []  # a staticmethod in the class
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile(ast.Module([function], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.2, 2.0), (1.0, 0.7)])
def test_generalized_jsd_and_its_gradient_equal_trl_gkd_loss_on_the_same_logits(beta, temperature):
    trl_loss = trl_generalized_jsd_loss()
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator) * 3
    teacher = torch.randn(2, 5, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, :2] = IGNORE_INDEX  # a masked prompt
    labels[1, 4] = IGNORE_INDEX  # padding
    student_theirs = student.clone().requires_grad_()
    theirs = trl_loss(student_theirs, teacher, labels, beta=beta, temperature=temperature)
    theirs.backward()
    kept = labels != IGNORE_INDEX
    student_ours = student.clone().requires_grad_()
    ours = generalized_jsd(student_ours[kept], teacher[kept], beta, temperature)
    (3 * ours).backward()  # the stored gradient is scaled by the incoming one
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_ours.grad, 3 * student_theirs.grad, rtol=1e-4, atol=1e-6)


def test_on_policy_targets_count_the_prompt_in_the_cross_entropy_and_generated_tokens_in_the_divergence():
    rows = torch.arange(12).view(2, 6)
    labels, compared = on_policy_targets(rows, prompt_tokens=4)
    assert labels.tolist() == [[0, 1, 2, 3, -100, -100], [6, 7, 8, 9, -100, -100]]
    # position t predicts token t + 1: positions 3 and 4 predict the generated tokens 4 and 5
    assert compared.tolist() == [[False, False, False, True, True]] * 2


def test_feature_projections_map_student_width_to_teacher_width_with_per_layer_weights_on_compared_positions():
    projections = FeatureProjections({0: 1, 1: 3}, {0: 1.0, 1: 0.5}, 2, 4, student_width=8, teacher_width=16)
    assert {name: tuple(p.shape) for name, p in projections.named_parameters()} == {
        "maps.0.weight": (16, 8),
        "maps.1.weight": (16, 8),
    }
    student = {0: torch.randn(2, 3, 8), 1: torch.randn(2, 3, 8)}
    teacher = {1: torch.randn(2, 3, 16), 3: torch.randn(2, 3, 16)}
    with torch.no_grad():
        projected = {layer: student[layer] @ projections.maps[str(layer)].weight.T for layer in (0, 1)}
    compared = torch.tensor([[True, False], [True, True]])  # (B, T - 1): the last position predicts nothing
    kept = [(0, 0), (1, 0), (1, 1)]
    expected = sum(
        weight * sum(((projected[s][b, t] - teacher[m][b, t]) ** 2).mean() for b, t in kept) / len(kept)
        for s, m, weight in ((0, 1, 1.0), (1, 3, 0.5))
    )
    torch.testing.assert_close(projections.loss(student, teacher, compared, "mse"), expected)
    cosine = torch.nn.functional.cosine_similarity(projected[0], teacher[1], dim=-1)
    torch.testing.assert_close(feature_distance(projected[0], teacher[1], "cosine"), (1 - cosine).mean())
    with pytest.raises(ConfigError, match=r"'feature_layers': 1: 4 is out of range.*teacher 0\.\.3"):
        FeatureProjections({1: 4}, {1: 1.0}, 2, 4, 8, 16)


@pytest.mark.parametrize("damage", [lambda data: data[:100], lambda data: b"", lambda data: b"junk" * 10])
def test_a_damaged_topk_cache_entry_is_refused_naming_it(tmp_path, damage):
    """An entry cut short or overwritten (a copy gone wrong, a full disk) failed the run with torch's
    "PytorchStreamReader failed reading zip archive ..." (or a bare EOFError), naming neither the file nor the cache."""
    cache = TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher")
    rows, every_position = torch.tensor([[5, 6, 7]]), torch.ones(1, 2, dtype=torch.bool)
    cache.write(rows, every_position, torch.randn(2, 10))
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(damage(entry.read_bytes()))
    with pytest.raises(ValueError, match=rf"teacher_cache .*cache: {entry.name} is damaged \(.*\); delete it, and"):
        cache.read(rows, every_position, 10)


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError(), PermissionError(13)])
def test_a_topk_cache_entry_the_machine_fails_to_load_is_not_called_damaged(tmp_path, monkeypatch, failure):
    """Out of memory loading a sound entry (or an I/O error) was refused as "is damaged ...; delete it": a user
    deleted a good entry, and the teacher scored its batch again. The machine's error is raised as it is."""
    cache = TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher")
    rows, every_position = torch.tensor([[5, 6, 7]]), torch.ones(1, 2, dtype=torch.bool)
    cache.write(rows, every_position, torch.randn(2, 10))

    def load(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(type(failure)) as raised:
        cache.read(rows, every_position, 10)
    assert raised.value is failure


@pytest.mark.parametrize(("written", "why"), [('{"teacher": "t', "Unterminated string"), ("[1, 2]", "a JSON list")])
def test_a_damaged_topk_cache_record_is_refused_naming_it(tmp_path, written, why):
    """A teacher.json of JSON that is no object ([1, 2], an editor's slip) failed with a bare "TypeError: 'list' object
    is not a mapping"; it is damaged, as one cut short is."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "teacher.json").write_text(written)
    with pytest.raises(ValueError, match=rf"teacher_cache .*cache: teacher.json is damaged \({why}.*\); give another"):
        TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher")


def test_topk_cache_keeps_the_top_k_and_spreads_the_rest_of_the_mass(tmp_path):
    cache = TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher")
    rows, every_position = torch.tensor([[5, 6, 7]]), torch.ones(1, 2, dtype=torch.bool)
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    assert cache.read(rows, every_position, 10) is None
    cache.write(rows, every_position, logits)
    restored = cache.read(rows, every_position, 10)
    exact = logits.log_softmax(-1)
    top = exact.topk(3, dim=-1)
    torch.testing.assert_close(restored.gather(1, top.indices), top.values, atol=2e-3, rtol=0)
    torch.testing.assert_close(restored.exp().sum(-1), torch.ones(2), atol=2e-3, rtol=0)
    for row in range(2):  # the rest of the mass spread evenly over the 7 other tokens
        others = restored[row].exp()[[v for v in range(10) if v not in top.indices[row].tolist()]]
        torch.testing.assert_close(others, others[:1].expand(7), rtol=1e-5, atol=0)
        assert others.sum().item() == pytest.approx(1 - top.values[row].exp().sum().item(), abs=2e-3)
    with pytest.raises(ValueError, match="use another folder"):
        TopKCache(tmp_path / "cache", top_k=5, teacher_dir=tmp_path / "teacher")
    # a bfloat16 teacher's log-probabilities are not the float32 teacher's: the cache is not reused for them
    with pytest.raises(ValueError, match='not of .*"teacher_dtype": "bfloat16".*or teacher_dtype'):
        TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher", teacher_dtype="bfloat16")
    TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher", teacher_dtype="float32")
    (info_file,) = [path for path in (tmp_path / "cache").iterdir() if path.suffix == ".json"]
    info_file.write_text('{"teacher": "/x", "top')  # cut short: a JSONDecodeError named nothing
    with pytest.raises(ValueError, match=rf"teacher_cache .*cache: {info_file.name} is damaged .*empty this one"):
        TopKCache(tmp_path / "cache", top_k=3, teacher_dir=tmp_path / "teacher")


def test_a_second_order_gradient_through_the_jsd_is_refused_not_returned_without_its_graph():
    """create_graph=True gave dL/ds without a graph (the backward scales a gradient made in the forward), so a gradient
    penalty through the distillation loss silently lost its part; it is refused, naming the loss."""
    student = torch.randn(4, 10, requires_grad=True)
    loss = generalized_jsd(student, torch.randn(4, 10), 0.5)
    with pytest.raises(RuntimeError, match=r"^generalized_jsd's backward .*create_graph=True"):
        torch.autograd.grad(loss, student, create_graph=True)
    assert torch.autograd.grad(generalized_jsd(student, torch.randn(4, 10), 0.5), student)[0].abs().sum() > 0
