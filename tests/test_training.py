"""The training step: gradient accumulation and checkpointing give the plain path's gradients;
balanced class weights; the compile fallback."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

import byot
from byot.training.build import balanced_class_weights
from byot.training.runtime import Runtime, compile_model
from byot.training.train import train_step

CPU = torch.device("cpu")


def runtime() -> Runtime:
    return Runtime(CPU, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25]))


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, 5, (n,), generator=g)


def grads_after(model: nn.Module, group, loss_fn) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves weights as they are
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, group, optimizer, loss_fn, runtime(), scaler, model.exit_stages)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def frozen_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = byot.create_model("multi_resnet18_kd", 5, width=4, image_size=16)
    model.train()
    # BatchNorm on running statistics: each sample's loss is then independent of the others in its
    # batch, so splitting a batch must not change the gradient (batch statistics would).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


@pytest.mark.parametrize("class_weights", [None, torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25])])
def test_accumulated_gradients_equal_the_whole_batch(class_weights):
    images, labels = batch(10)
    # with class weights the label terms are weighted means: each part's share is its part of the whole
    # batch's summed weights, not of its images (the same rule serves torchrun's per-process parts)
    loss_fn = byot.SelfDistillLoss(alpha=0.3, beta=1e-3, class_weights=class_weights)
    whole = grads_after(frozen_bn_model(), [(images, labels)], loss_fn)
    parts = [(images[:4], labels[:4]), (images[4:7], labels[4:7]), (images[7:], labels[7:])]  # unequal sizes
    accumulated = grads_after(frozen_bn_model(), parts, loss_fn)
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], rtol=1e-4, atol=1e-6), name
    # the hint (a mean over images, like the other terms) reaches the shallow exits' heads
    assert any(torch.count_nonzero(g) for n, g in whole.items() if n.startswith("heads.0"))


def test_gradient_checkpointing_gives_the_same_gradients_and_statistics():
    images, labels = batch(6, seed=1)
    loss_fn = byot.SelfDistillLoss()
    torch.manual_seed(3)
    plain = byot.create_model("multi_resnet18_kd", 5, width=4, image_size=16).train()
    checkpointed = byot.create_model("multi_resnet18_kd", 5, width=4, image_size=16).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.grad_checkpoint = True
    g_plain = grads_after(plain, [(images, labels)], loss_fn)
    g_ckpt = grads_after(checkpointed, [(images, labels)], loss_fn)
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ckpt[name], rtol=1e-4, atol=1e-6), name
    # the recomputation in backward must not update BatchNorm's running statistics a second time
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(a, b), name


def test_balanced_class_weights_golden():
    # 6 images: 3 of class 0, 2 of class 1, 1 of class 2, none of class 3 -> N / (K n_c) with K = 4
    w = balanced_class_weights([3, 2, 1, 0], CPU)
    assert w.tolist() == pytest.approx([6 / 12, 6 / 8, 6 / 4, 0.0])
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    out = byot.MultiExitOutput([logits], [torch.zeros(2, 3)])
    loss = byot.SelfDistillLoss(alpha=0.0, beta=0.0, class_weights=w)(out, torch.tensor([0, 2]))["loss"]
    l0 = -torch.log_softmax(logits[0], 0)[0]
    l1 = -torch.log_softmax(logits[1], 0)[2]
    assert loss.item() == pytest.approx(((0.5 * l0 + 1.5 * l1) / 2.0).item(), rel=1e-6)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    model = byot.create_model("multi_resnet18_kd", 5, width=4, image_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken_compile(m):
        def fail(*args, **kwargs):
            raise RuntimeError("no C compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(logging.getLogger("byot"), "propagate", True)  # the CLI tests turn it off
    with caplog.at_level("WARNING", logger="byot"):
        forward = compile_model(model, batch(2)[0], runtime())
    assert forward is model
    assert "torch.compile failed (no C compiler found)" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_skip_only_scaler_keeps_its_scale_after_skipped_steps():
    model = frozen_bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    rt = runtime()
    scaler = rt.grad_scaler()
    images, labels = batch(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # three NaN steps: GradScaler alone would halve its scale each time (0.125 after three)
        poisoned = byot.SelfDistillLoss(temperature=float("nan"))
        outcome = train_step(model, [(images, labels)], optimizer, poisoned, rt, scaler, model.exit_stages)
        assert bool(outcome.bad)
    assert scaler.get_scale() == 1.0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no update was applied
    outcome = train_step(model, [(images, labels)], optimizer, byot.SelfDistillLoss(), rt, scaler, model.exit_stages)
    assert not bool(outcome.bad) and any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def previous_objective(output, labels, cfg, parts: list[int], class_weights=None) -> torch.Tensor:
    """byot train's objective of one step before its loss terms became means, written out: label and KD terms
    are means over the step's images (label terms class-weighted means); the ICCV hint a sum over the step's
    images and channels; the journal's distance the norm of each accumulated part's (B, C) difference, scaled
    by the square root of the part's share of the step's images (its code's norm, for one part)."""
    logits, features = output.logits, output.features
    n, total = len(logits), len(labels)
    teacher = torch.softmax(logits[-1].detach() / cfg.temperature, dim=1)
    kd_weight = cfg.alpha * cfg.temperature**2 if cfg.kd_t2 else cfg.alpha
    objective = torch.zeros(())
    for i, z in enumerate(logits, start=1):
        weight = cfg.deepest_ce if i == n and cfg.deepest_ce is not None else 1 - cfg.alpha
        objective = objective + weight * nn.functional.cross_entropy(z, labels, weight=class_weights)
    skip = n - 1 if cfg.feature_skip == "second-deepest" else None
    bounds = torch.tensor([0, *parts]).cumsum(0).tolist()
    for i in range(1, n):
        z, f, ft = logits[i - 1], features[i - 1], features[-1].detach()
        objective = objective - kd_weight * (teacher * torch.log_softmax(z / cfg.temperature, dim=1)).sum(1).mean()
        if cfg.feature_loss == "hint":
            objective = objective + cfg.beta * ((f - ft) ** 2 * ((f > 0) | (ft > 0))).sum()
        elif i != skip:
            for lo, hi in itertools.pairwise(bounds):
                share = (hi - lo) / total
                objective = objective + cfg.beta * share**0.5 * torch.linalg.vector_norm(f[lo:hi] - ft[lo:hi])
    return objective


@pytest.mark.parametrize("recipe,step,parts", [
    ("iccv", {"batch_size": 8}, [8]),
    ("iccv", {"batch_size": 4, "accum_steps": 2}, [4, 4]),
    ("iccv", {"batch_size": 4, "accum_steps": 2, "class_weights": "balanced"}, [4, 4]),
    ("iccv", {"batch_size": 8}, [5]),  # an epoch's last step, smaller than a full one
    ("iccv", {"batch_size": 8}, [11]),  # ... or larger: a last batch under half a batch joins the one before
    ("iccv", {"batch_size": 4, "accum_steps": 2}, [4, 2]),
    ("journal", {"batch_size": 8}, [8]),
    ("journal", {"batch_size": 4, "accum_steps": 2}, [4, 4]),
    ("journal", {"batch_size": 8}, [6]),
])
def test_a_training_step_has_the_gradients_of_the_previous_objective(recipe, step, parts):
    # --beta keeps its meaning (the weight of the hint summed over a step's images, the references' scale):
    # the engine converts it for the loss's per-image terms, and every step's gradients stay what they were
    from byot.config import build_config
    from byot.data import DataBundle
    from byot.training.build import build_loss, build_model

    cfg = build_config({}, {"recipe": recipe, "dataset": "digits", "image_size": 16, "width": 4, **step,
                            **({"beta": 1e-2} if recipe == "iccv" else {})})  # a hint large enough to matter
    counts = [5, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    data = DataBundle(None, None, [str(i) for i in range(10)], 16, (0, 0, 0), (1, 1, 1), counts)

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = build_model(cfg, 10, 16).train()
        for m in net.modules():  # running statistics: a split batch has the whole batch's outputs
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return net

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (sum(parts), 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (sum(parts),), generator=g)
    bounds = torch.tensor([0, *parts]).cumsum(0).tolist()
    group = [(images[lo:hi], labels[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    engine = model()
    loss_fn = build_loss(cfg, data, CPU, engine.exit_stages)
    optimizer = torch.optim.SGD(engine.parameters(), lr=0.0)
    train_step(engine, group, optimizer, loss_fn, runtime(), torch.amp.GradScaler("cpu", enabled=False),
               engine.exit_stages, global_total=sum(parts), full_total=cfg.batch_size * cfg.accum_steps)

    reference = model()
    weights = balanced_class_weights(counts, CPU) if cfg.class_weights == "balanced" else None
    previous_objective(reference(runtime().inputs(images)), labels, cfg, parts, weights).backward()
    for (name, p), q in zip(engine.named_parameters(), reference.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-8, name
