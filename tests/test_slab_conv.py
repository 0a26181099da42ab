"""training.slab_conv: a batch-1 3D convolution cut into depth slabs computes the convolution exactly (outputs
and every gradient), runs on oneDNN where ATen would take its slow path, and leaves the state dict and the
ONNX export as they were."""
import pytest
import torch
from torch import nn

from training.slab_conv import SlabConv3d, _slab_plan, route_convolutions, slab_conv3d


@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, depth", [
    (12, 12, 3, 1, 1, 1, 16),   # SwinUNETR-tiny's residual blocks at 1/2 resolution
    (12, 24, 3, 2, 1, 1, 17),   # a strided UNet down-convolution, odd depth
    (6, 6, 3, 1, 1, 1, 7),      # output depth that two slabs do not divide
    (24, 12, 1, 1, 0, 1, 8),    # 1x1x1
    (4, 4, 3, 1, 2, 2, 9),      # dilated
    (3, 5, (3, 1, 3), 1, (1, 0, 1), 1, 6),  # anisotropic kernel
])
def test_slabs_compute_the_convolution_and_its_gradients(cin, cout, kernel, stride, padding, dilation, depth):
    torch.manual_seed(0)
    plain = nn.Conv3d(cin, cout, kernel, stride, padding, dilation)
    x = torch.randn(1, cin, depth, 10, 6, requires_grad=True)
    y = plain(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = (y.detach(), x.grad.clone(), plain.weight.grad.clone(), plain.bias.grad.clone())

    x.grad = None
    plain.zero_grad()
    out = slab_conv3d(x, plain.weight, plain.bias, plain.stride, plain.padding, plain.dilation, 1, slabs=2)
    assert out.shape == y.shape
    out.backward(grad)
    for got, want in zip((out.detach(), x.grad, plain.weight.grad, plain.bias.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # sums over ~10³ voxels, in another order


def test_slab_plan_covers_every_output_once():
    # 7 outputs in two slabs of 4: the second starts at output 3 and drops the one it shares with the first.
    assert _slab_plan(depth=7, kernel=3, stride=1, padding=1, dilation=1, slabs=2) == [(0, 6, 0), (3, 9, 1)]
    for depth in range(2, 12):
        for stride in (1, 2):
            plan = _slab_plan(depth, 3, stride, 1, 1, 2)
            out = (depth + 2 - 3) // stride + 1
            if out < 2:
                assert plan is None
                continue
            length = -(-out // 2)
            kept = sum(length - keep for _, _, keep in plan)
            assert kept == out, (depth, stride, plan)
    assert _slab_plan(depth=1, kernel=3, stride=1, padding=1, dilation=1, slabs=2) is None


def test_routed_module_takes_onednn_where_aten_takes_its_slow_path_and_keeps_the_state_dict():
    torch.manual_seed(0)
    conv = nn.Conv3d(12, 12, 3, padding=1)
    x = torch.randn(1, 12, 32, 32, 16)
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, None)
    # The premise, read from PyTorch itself: this call is on ATen's slow path.
    assert torch._C._select_conv_backend(x, conv.weight, None, *args) == torch._C._ConvBackend.Slow3d

    model = nn.Sequential(conv, nn.ReLU(), nn.ConvTranspose3d(12, 4, 2, stride=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
    assert route_convolutions(model) == 1  # the transposed convolution is left alone
    assert type(model[0]) is SlabConv3d and type(model[2]) is nn.ConvTranspose3d
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            got = model(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops, ops
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # A fresh plain model loads the routed one's state dict.
    fresh = nn.Sequential(nn.Conv3d(12, 12, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(12, 4, 2, stride=2))
    fresh.load_state_dict(model.state_dict())


def test_a_call_already_on_onednn_is_not_slabbed():
    conv = nn.Conv3d(12, 12, 3, padding=1)
    route_convolutions(conv)
    x = torch.randn(1, 12, 64, 64, 32)  # N·C·D·H = 49152: ATen sends it to oneDNN itself
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            conv(x)
    assert "aten::cat" not in {e.key for e in prof.key_averages()}


def test_onnx_export_of_a_routed_model_sees_one_convolution(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU()).eval()
    route_convolutions(model)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 4, 16, 16, 8),), str(path), dynamo=True, optimize=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 1 and "Concat" not in ops and "Slice" not in ops, ops


def test_fit_routes_a_cpu_model_unless_told_not_to_and_a_resume_may_switch(tmp_path):
    from training import TrainSettings, fit
    from training_toy import TinySegNet, loss_fn, random_batches

    def run(out, steps, slab):
        torch.manual_seed(0)
        model = TinySegNet()
        fit(model, loss_fn, random_batches(), TrainSettings(steps=steps, lr=1e-2, progress=False, slab_conv=slab), out)
        return model

    assert type(run(tmp_path / "a", 2, True).conv1) is SlabConv3d
    off = run(tmp_path / "b", 2, False)
    assert type(off.conv1) is nn.Conv3d and type(off.head) is nn.Conv3d
    # A speed setting, not a recipe: a run resumed with the other value is accepted and continues.
    assert type(run(tmp_path / "b", 4, True).conv1) is SlabConv3d


def test_fit_in_channels_last_trains_the_same_model_and_its_checkpoint_loads_anywhere(tmp_path):
    """``channels_last``: the weights train in torch.channels_last_3d and the batch's 5-D floating tensors (teacher
    targets too) reach the loss in it; the losses follow the default layout's to float rounding, and the checkpoint loads
    into a plain (contiguous) model."""
    from training import TrainSettings, fit
    from training.checkpoint import load_checkpoint
    from training.loop import _to_device
    from training_toy import TinySegNet, loss_fn, random_batches

    def run(out, channels_last):
        torch.manual_seed(0)
        model = TinySegNet()
        result = fit(model, loss_fn, random_batches(), TrainSettings(steps=6, lr=1e-2, progress=False, val_every=3,
                                                                     channels_last=channels_last),
                     out, val_fn=lambda m: {"dice": 0.5})
        return model, result

    plain, plain_result = run(tmp_path / "plain", False)
    assert plain.conv1.weight.stride() == (27, 27, 9, 3, 1)  # 8 x 1 x 3³: the input-channel stride tells the layout
    last, last_result = run(tmp_path / "cl", True)
    assert last.conv1.weight.stride() == (27, 1, 9, 3, 1)
    losses = [h.get("train_loss") for h in plain_result.history]
    assert None not in losses
    assert losses == pytest.approx([h.get("train_loss") for h in last_result.history], rel=1e-4, abs=1e-5)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(last.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
    fresh = TinySegNet()
    fresh.load_state_dict(load_checkpoint(tmp_path / "cl" / "last.pt")["model"])  # last.pt: the final weights
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(fresh(x), last.eval()(x.contiguous(memory_format=torch.channels_last_3d)),
                               rtol=1e-4, atol=1e-5)

    batch = {"target": torch.randn(1, 8, 6, 6, 4), "label": torch.zeros(1, 1, 6, 6, 4, dtype=torch.long), "w": [1.0]}
    moved = _to_device(batch, torch.device("cpu"), torch.channels_last_3d)
    assert moved["target"].is_contiguous(memory_format=torch.channels_last_3d) and not moved["target"].is_contiguous()
    assert moved["label"].is_contiguous() and moved["w"] == [1.0]
    torch.testing.assert_close(moved["target"], batch["target"])
    assert _to_device(batch, torch.device("cpu"))["target"].is_contiguous()


def test_fit_in_channels_last_takes_a_model_that_also_holds_2d_weights(tmp_path):
    """The teacher mixes 3-D and 2-D (SAM) layers; ``Module.to(memory_format=channels_last_3d)`` refuses the 4-D weights,
    so fit converts the 5-D tensors only and leaves the rest as they are."""
    from training import TrainSettings, fit
    from training_toy import TinySegNet, loss_fn, random_batches

    class Mixed(TinySegNet):
        def __init__(self):
            super().__init__()
            self.plane = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, image):
            out = super().forward(image)
            b, c, x, y, z = out.shape
            flat = out.permute(0, 4, 1, 2, 3).reshape(b * z, c, x, y)
            return out + self.plane(flat).reshape(b, z, c, x, y).permute(0, 2, 3, 4, 1)

    torch.manual_seed(0)
    model = Mixed()
    plane = model.plane.weight
    fit(model, loss_fn, random_batches(), TrainSettings(steps=2, lr=1e-2, progress=False, channels_last=True),
        tmp_path / "mixed")
    assert model.conv1.weight.stride() == (27, 1, 9, 3, 1)
    assert model.plane.weight is plane and model.plane.weight.is_contiguous()


def test_under_cpu_bf16_autocast_a_kernel_larger_than_its_input_runs_in_float32():
    """oneDNN's bf16 backward gave garbage weight gradients for such calls on an AVX512-BF16 EPYC (16 -> 16, 3³, on
    2³ voxels: 53 of 100 calls up to 1e36); routed, the call is a float32 convolution with float32 gradients."""
    from training.slab_conv import SlabConv3d

    torch.manual_seed(0)
    conv = SlabConv3d(16, 16, 3, padding=1)
    plain = nn.Conv3d(16, 16, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 2, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        big = conv(torch.randn(2, 16, 4, 4, 4))
    assert y.dtype == torch.float32 and big.dtype == torch.bfloat16, "only the overhanging call leaves bf16"
    y.pow(2).mean().backward()
    plain(x).pow(2).mean().backward()
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)
