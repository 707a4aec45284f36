"""The training step: gradient accumulation and checkpointing give the plain path's gradients;
balanced class weights; the compile fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import byot
from byot.engine.build import balanced_class_weights
from byot.engine.runtime import Runtime, compile_model
from byot.engine.train import train_step

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
