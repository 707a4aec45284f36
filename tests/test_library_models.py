"""timm/NAME and tv/NAME: library backbones split into stages on the multi-exit contract. The golden values are
the libraries' own: the staged forward against the library model's forward with the same weights, the
backbone's parameter count against the library model's, a file the library wrote loaded tensor for tensor."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_cascade_is_the_policy

from byot.cli import main
from byot.config import build_config
from byot.deploy.run import export_checkpoint
from byot.errors import ByotError
from byot.models import create_model
from byot.models.base import AdaptedHead
from byot.models.pretrained import load_pretrained
from byot.training.build import build_trained, load_data
from byot.training.checkpoint import load_checkpoint
from byot.training.fit import fit
from byot.training.runtime import build_optimizer
from byot.training.train import lr_at

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
# (byot name, options, the library's own builder with the same options)
TIMM_CNNS = ["convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "resnet18", "densenet121"]
TV_CNNS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5"]
CASES = ([(f"timm/{n}", {}, lambda n=n, k=5: timm.create_model(n, num_classes=k)) for n in TIMM_CNNS]
         + [("timm/vit_tiny_patch16_224", {"patch_size": 8},
             lambda k=5: timm.create_model("vit_tiny_patch16_224", num_classes=k, img_size=32, patch_size=8)),
            ("timm/deit_tiny_patch16_224", {},
             lambda k=5: timm.create_model("deit_tiny_patch16_224", num_classes=k, img_size=32)),
            # Swin's stages hand on channels-last maps: its shallow exits read them through a permute
            ("timm/swin_tiny_patch4_window7_224", {},
             lambda k=5: timm.create_model("swin_tiny_patch4_window7_224", num_classes=k, img_size=32))]
         + [(f"tv/{n}", {}, lambda n=n, k=5: torchvision.models.get_model(n, weights=None, num_classes=k))
            for n in TV_CNNS]
         + [("tv/vit_b_32", {}, lambda k=5: torchvision.models.vit_b_32(weights=None, num_classes=k, image_size=32))])


def _pair(name, options, library):
    """The byot model and the library's own, built from the same seed: the same backbone weights."""
    torch.manual_seed(0)
    own = library()
    torch.manual_seed(0)
    return create_model(name, 5, 32, **options), own


@pytest.mark.parametrize("name, options, library", CASES, ids=[c[0] for c in CASES])
def test_the_staged_forward_is_the_library_models_forward(name, options, library):
    net, own = _pair(name, options, library)
    net.eval(), own.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        assert torch.allclose(out.logits[-1], own(x), atol=1e-5, rtol=1e-4)
        # the backbone is the library's, tensor for tensor: only the shallow exits (and adaptations) are new
        shallow = sum(p.numel() for h in net.heads[:-1] for p in h.parameters())
        assert sum(p.numel() for p in net.parameters()) - shallow == sum(p.numel() for p in own.parameters())
        # real staged execution: depth k runs the stages up to k and returns only the exits up to it
        first = net.exit_stages[0]
        shallow_only = net(x, depth=first)
        assert len(shallow_only.logits) == 1 and torch.allclose(shallow_only.logits[0], out.logits[0], atol=1e-6)
        assert torch.allclose(net.forward_exit(x, first), out.logits[0], atol=1e-6)
    # every exit's feature is as wide as the teacher's (adapted where the head's is not): the hint compares them
    assert len({f.shape[1] for f in out.features}) == 1


def test_transformer_exits_are_numbered_by_block():
    vit = create_model("timm/vit_tiny_patch16_224", 5, 32, patch_size=8)
    assert vit.exit_stages == [3, 6, 9, 12] and vit.stage_shapes[0].layout == "tokens"
    assert vit.stage_shapes[0].height == 1 + (32 // 8) ** 2  # the class token and the patches
    assert create_model("timm/vit_tiny_patch16_224", 5, 32, exits=(2, 4), patch_size=8).exit_stages == [2, 4, 12]
    attention = create_model("timm/vit_tiny_patch16_224", 5, 32, head="attention", patch_size=8)
    assert attention.heads[0].score is not None  # the token attention exit scores every token
    with pytest.raises(ByotError, match="stages 1 to 11"):
        create_model("timm/vit_tiny_patch16_224", 5, 32, exits=(13,), patch_size=8)


def test_a_head_wider_than_the_last_stage_gets_adapted_features():
    # timm's MobileNetV3 widens 288 -> 1024 channels in its own head, after the pooling
    net = create_model("timm/mobilenetv3_small_050", 5, 32)
    assert net.stage_shapes[-1].channels == 288
    assert all(isinstance(h, AdaptedHead) and h.adapt.out_features == 1024 for h in net.heads[:-1])
    assert create_model("timm/convnext_atto", 5, 32).heads[0].__class__.__name__ == "BottleneckExit"


def test_pretrained_files_load_into_the_backbone_and_others_are_refused(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "atto.safetensors"))
    net = create_model("timm/convnext_atto", 5, 32)
    fresh_fc = net.heads[-1].classifier.weight.clone()
    summary = load_pretrained(net, tmp_path / "atto.safetensors")
    assert summary["loaded"] == len(source.state_dict()) - 2  # all but the 1000-class classifier
    for key, lib_key in net.library_keys.items():
        if key not in net.classifier_keys:
            assert torch.equal(net.state_dict()[key], source.state_dict()[lib_key]), key
    assert torch.equal(net.heads[-1].classifier.weight, fresh_fc)  # the classifier starts fresh
    # a file of another model: refused before anything is copied
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ByotError, match="does not fit timm/convnext_atto's backbone"):
        load_pretrained(net, tmp_path / "resnet18.pth")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # a ViT trained at 224 px (14 x 14 patches) fine-tuned at 64 px: the position embedding is resampled
    vit224 = timm.create_model("vit_tiny_patch16_224")
    torch.save({"state_dict": vit224.state_dict()}, tmp_path / "vit.pth")
    vit = create_model("timm/vit_tiny_patch16_224", 5, 64)
    load_pretrained(vit, tmp_path / "vit.pth")
    assert torch.equal(vit.stages[4][0].attn.qkv.weight, vit224.blocks[4].attn.qkv.weight)
    assert torch.equal(vit.stem.pos_embed[:, 0], vit224.pos_embed[:, 0])  # the class token's entry kept
    assert vit.stem.pos_embed.shape == (1, 1 + 16, 192)
    # Swin's relative position tables for another window grid: through timm's own checkpoint filter
    torch.save(timm.create_model("swin_tiny_patch4_window7_224").state_dict(), tmp_path / "swin.pth")
    assert load_pretrained(create_model("timm/swin_tiny_patch4_window7_224", 5, 32), tmp_path / "swin.pth")[
        "shape_mismatch"] == []
    # torchvision's own file layout
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    tv = create_model("tv/resnet18", 5, 32)
    assert load_pretrained(tv, tmp_path / "tv.pth")["loaded"] == 120


def test_bad_names_and_sizes_are_one_line(monkeypatch):
    with pytest.raises(ByotError, match="did you mean timm/convnext_tiny"):
        create_model("timm/convnext_tinyy", 5, 32)
    with pytest.raises(ByotError, match="did you mean tv/resnet50"):
        create_model("tv/resnet5O", 5, 32)
    with pytest.raises(ByotError, match="multiple of 16 \\(32, 48"):
        create_model("timm/vit_tiny_patch16_224", 5, 40)
    with pytest.raises(ByotError, match="cannot split this network into stages"):
        create_model("timm/fastvit_t8", 5, 64)  # its stages run in a loop of its own, not as modules in turn
    with pytest.raises(ByotError, match="channels-last backbones \\(Swin, MaxViT\\) are not supported yet"):
        create_model("tv/swin_t", 5, 64)
    with pytest.raises(ByotError, match="not of resnet18"):
        create_model("timm/resnet18", 5, 32, patch_size=8)
    with pytest.raises(ByotError, match="the name says the model"):
        create_model("timm/resnet18", 5, 32, model="resnet50")
    with pytest.raises(ByotError, match="takes no option width; its options: model, drop_path_rate, patch_size"):
        create_model("timm/resnet18", 5, 32, width=16)
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ByotError, match='pip install "byot\\[timm\\]"'):
        create_model("timm/resnet18", 5, 32)


def test_adamw_groups_and_the_warmup():
    net = create_model("timm/vit_tiny_patch16_224", 5, 32, patch_size=8)
    optimizer = build_optimizer(net, 1e-3, 0.9, 0.05, "adamw", backbone_lr_scale=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in net.named_parameters()}
    for group in optimizer.param_groups:
        in_trunk = all(names[id(p)].startswith(("stem.", "stages.")) for p in group["params"])
        assert group["lr"] == pytest.approx(1e-4 if in_trunk else 1e-3)
        flat = all(p.dim() < 2 or names[id(p)].endswith(("pos_embed", "cls_token")) for p in group["params"])
        assert group["weight_decay"] == (0.0 if flat else 0.05)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    tokens = [g["weight_decay"] for g in optimizer.param_groups for p in g["params"]
              if names[id(p)] in ("stem.cls_token", "stem.pos_embed")]
    assert tokens == [0.0, 0.0]  # (1, 1, C) and (1, N, C): not norms or biases, but never decayed either
    # a library head's pretrained layers besides the classifier are backbone: timm's MobileNetV3 conv_head
    mobile = create_model("timm/mobilenetv3_small_050", 5, 32)
    groups = build_optimizer(mobile, 1e-3, 0.9, 0.05, "adamw", backbone_lr_scale=0.1).param_groups
    names = {id(p): n for n, p in mobile.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["heads.3.parts.conv_head.weight"] == 0.1 and scale["heads.3.parts.classifier.weight"] == 1.0
    # SGD at scale 1 keeps the one group older checkpoints' optimizer states have
    assert len(build_optimizer(net, 0.1, 0.9, 5e-4).param_groups) == 1
    # 2 warm-up epochs rise to the base rate, then the cosine runs over the 8 epochs left
    assert [lr_at(e, 0.3, 10, "cosine", 2) for e in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(6, 0.3, 10, "cosine", 2) == pytest.approx(lr_at(4, 0.3, 8, "cosine"))


def _vit_config(data_dir: Path, folder: Path, epochs: int, **extra):
    return build_config({}, {"arch": "timm/vit_tiny_patch16_224", "model_options": {"patch_size": 8},
                             "dataset": "imagefolder", "data_dir": str(data_dir), "image_size": 32, "epochs": epochs,
                             "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                             "warmup_epochs": 1, "backbone_lr_scale": 0.5, "schedule": "cosine", "amp": "off",
                             "save_folder": str(folder), "progress": False, "workers": 0, **extra})


def test_a_vit_run_resumes_exactly_and_its_cascade_is_the_policy(cifar10_jpg, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(_vit_config(cifar10_jpg, straight, 2), overwrite=True)
    fit(_vit_config(cifar10_jpg, resumed, 2), overwrite=True, stop_after=1)
    latest = resumed / "timm" / "vit_tiny_patch16_224" / "checkpoint_latest.pth.tar"
    fit(_vit_config(cifar10_jpg, resumed, 2, resume=str(latest)), load_checkpoint(latest))
    a = load_checkpoint(straight / "timm" / "vit_tiny_patch16_224" / "checkpoint_latest.pth.tar")
    b = load_checkpoint(latest)
    assert a["epoch"] == b["epoch"] == 2 and a["model_spec"]["exits"] == [3, 6, 9, 12]
    assert not [k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])]
    cfg = _vit_config(cifar10_jpg, straight, 2, resume=str(latest))
    model, runtime = build_trained(cfg, b, torch.device("cpu"))
    assert_cascade_is_the_policy(model, runtime, load_data(cfg, torch.device("cpu")).test)
    # exit 6 alone (the stem, blocks 1-6 and its token exit) as ONNX, checked under onnxruntime
    pytest.importorskip("onnxruntime")
    result = export_checkpoint(cfg, b, "6", "onnx", tmp_path / "vit_exit6.onnx")
    assert result["exits"] == [6] and result["max_abs_diff"] < 1e-4


def test_fine_tune_a_timm_convnext_from_a_local_file_then_deploy_exit_2(cifar10_jpg, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "convnext_atto.safetensors"
    state = timm.create_model("convnext_atto").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    runs = tmp_path / "runs"
    data = ["--dataset", "imagefolder", "--data-dir", str(cifar10_jpg), "--workers", "0"]
    assert main(["train", "timm/convnext_atto", *data, "--image-size", "32", "--epochs", "1", "--batch-size", "40",
                 "--pretrained", str(weights), "--optimizer", "adamw", "--lr", "1e-3", "--backbone-lr-scale", "0.1",
                 "--save-folder", str(runs), "--no-progress"]) == 0
    err = capsys.readouterr().err
    # everything but timm's 1000-class classifier; the images normalised as timm's weights expect
    assert f"loaded {len(state) - 2} tensors" in err and "mean [0.485, 0.456, 0.406]" in err
    checkpoint = runs / "timm" / "convnext_atto" / "checkpoint_latest.pth.tar"
    assert load_checkpoint(checkpoint)["normalization"][0] == pytest.approx([0.485, 0.456, 0.406])
    assert main(["test", "timm/convnext_atto", *data, "--resume", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["exit"] for e in result["exits"]] == [1, 2, 3, 4] and result["num_images"] == 40
    assert main(["early-exit", "timm/convnext_atto", *data, "--resume", str(checkpoint)]) == 0
    capsys.readouterr()
    assert main(["test", "timm/resnet18", *data, "--resume", str(checkpoint)]) == 2  # another model's checkpoint
    err = capsys.readouterr().err
    assert "timm/resnet18" in err and "timm/convnext_atto" in err and "Traceback" not in err
    onnx = tmp_path / "exit2.onnx"
    assert main(["export", "timm/convnext_atto", "--resume", str(checkpoint), "--exit", "2", "--format", "onnx",
                 "--out", str(onnx)]) == 0
    image = next((cifar10_jpg / "test" / "cat").iterdir())
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_predict.py"), str(onnx), str(image)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    answer = json.loads(out)[0]
    assert answer["exit"] == 2 and answer["class"] in {p.name for p in (cifar10_jpg / "train").iterdir()}


@pytest.mark.parametrize("name, gmacs", [("timm/convnext_tiny", 4.5), ("timm/vit_small_patch16_224", 4.6)])
def test_flops_per_exit_at_224_px_match_the_published_cost(name, gmacs):
    from byot.models.cost import exit_costs

    with torch.device("meta"):  # shapes only: counted in a second
        model = create_model(name, 1000, 224)
    costs = exit_costs(model, 224)
    flops = [c["flops"] for c in costs]
    # the same count on real CPU tensors, where attention runs through a fused kernel (counted as its matmuls)
    tiny = create_model(name.replace("small", "tiny").replace("convnext_tiny", "convnext_atto"), 10, 64)
    with torch.device("meta"):
        tiny_meta = create_model(tiny.arch, 10, 64)
    assert [c["flops"] for c in exit_costs(tiny, 64)] == [c["flops"] for c in exit_costs(tiny_meta, 64)]
    assert flops == sorted(flops) and len(flops) == 4
    # the deepest exit is the plain model (stem, stages, its own head): timm's model cards give its
    # multiply-adds to one decimal
    assert abs(flops[-1] / 2e9 - gmacs) <= 0.06


def test_the_librarys_own_weights_without_a_network_are_one_line(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty caches: nothing to fall back on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for name, library in (("timm/resnet18", "timm"), ("tv/resnet18", "torchvision")):
        net = create_model(name, 5, 32)
        with pytest.raises(ByotError, match=f"cannot get {library}'s pretrained weights for resnet18 .*"
                                            "pass --pretrained PATH") as error:
            load_pretrained(net, None)
        assert "\n" not in str(error.value)


def test_a_wrong_split_is_refused_even_where_the_logits_are_tiny():
    from torch import nn

    from byot.models.library import check_split
    from byot.models.torchvision_family import split_cnn

    # torchvision's MNASNet starts with logits of about 1e-8: an absolute tolerance would pass anything
    own = torchvision.models.mnasnet0_5(weights=None, num_classes=5)
    split = split_cnn(own, "tv/mnasnet0_5", 32)
    check_split("tv/mnasnet0_5", split, own, 32)  # the real split passes
    split.stages[0] = nn.Sequential(split.stages[0], nn.ReLU())  # one change inside the trunk
    with pytest.raises(ByotError, match="cannot split it into stages"):
        check_split("tv/mnasnet0_5", split, own, 32)


def test_swin_at_384_px_keeps_its_channels_last_layout():
    # at 384 px Swin's first stage is 96 x 96 x 96: the layout comes from timm, not from the shape
    with torch.device("meta"):
        net = create_model("timm/swin_tiny_patch4_window7_224", 5, 384)
    assert [s.layout for s in net.stage_shapes] == ["nhwc"] * 4 and net.stage_shapes[0].channels == 96
