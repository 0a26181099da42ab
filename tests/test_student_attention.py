"""The fused window attention (one scaled_dot_product_attention call) computes MONAI's explicit one."""
import torch

from student import build_student
from student.swin_attention import FusedWindowAttention, use_fused_attention


def test_fused_window_attention_matches_the_explicit_one_in_outputs_and_gradients():
    torch.manual_seed(0)
    explicit = build_student("swinunetr_tiny", 4, options={"window_size": 4})
    fused = build_student("swinunetr_tiny", 4, options={"window_size": 4})
    fused.load_state_dict(explicit.state_dict())
    # Every attention block is switched, the shifted ones (with the -100 mask) included; the parameters stay.
    params = [id(p) for p in fused.parameters()]
    assert use_fused_attention(fused) == 8
    assert [id(p) for p in fused.parameters()] == params
    assert sum(isinstance(m, FusedWindowAttention) for m in fused.modules()) == 8
    assert sum(isinstance(m, FusedWindowAttention) for m in explicit.modules()) == 0
    x = torch.randn(1, 1, 64, 64, 32)
    out_e, out_f = explicit(x), fused(x)
    assert out_e.abs().max() > 0.5  # a real output, not a degenerate one
    torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-4)
    (out_e.square().mean()).backward()
    (out_f.square().mean()).backward()
    for (name, p_e), p_f in zip(explicit.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_f.grad, p_e.grad, rtol=1e-3, atol=1e-6, msg=name)
    # The state dict is MONAI's: it loads back into an explicit network unchanged.
    again = build_student("swinunetr_tiny", 4, options={"window_size": 4})
    again.load_state_dict(fused.state_dict())
    torch.testing.assert_close(again(x), out_e, rtol=1e-4, atol=1e-4)
