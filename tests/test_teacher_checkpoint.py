"""Official-SAM-format weights load into the 3D teacher; PEFT freezes the right tensors; teacher.pt round-trips."""
from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT, get_rel_pos

from teacher import (
    SamCheckpointError,
    TeacherCheckpointError,
    build_teacher,
    count_parameters,
    load_sam_state_dict,
    load_teacher,
    save_teacher,
)
from teacher.attention import relative_position_table

torch.set_num_threads(2)

# A small teacher whose ViT matches the small SAM encoder below (dim 64, depth 4, 4 heads, 256 px -> 16x16 table).
CFG = {"preset": "tiny", "roi_size": [16, 16, 16], "arch": {"embed_dim": 64, "num_heads": 4}}


def sam_state_dict(embed_dim=64, depth=4, num_heads=4, seed=0) -> dict:
    """State dict of a real segment_anything ImageEncoderViT, keyed like an official SAM checkpoint."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=256, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
        global_attn_indexes=(1, 3), out_chans=256, qkv_bias=True,
    )
    with torch.no_grad():
        for p in encoder.parameters():  # SAM starts pos_embed and rel-pos tables at zero: make every tensor distinct
            p.normal_(0, 0.05)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return state


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_small.pth"
    torch.save(sam_state_dict(), path)
    return path


def test_every_reused_key_is_consumed_and_frozen_weights_equal_the_source(sam_file):
    source = torch.load(sam_file)
    model = build_teacher(CFG, num_classes=3, checkpoint=sam_file)
    params = dict(model.named_parameters())

    sam_keys = {f"image_encoder.{k}" for k in model.image_encoder.sam_keys()}
    encoder_keys = {k for k in source if k.startswith("image_encoder.") and not k.startswith("image_encoder.neck.")}
    assert sam_keys == encoder_keys  # every SAM encoder tensor except its 2D neck has a place

    for key in sam_keys:
        if key.endswith(("rel_pos_h", "rel_pos_w")):
            # Resized to the 8^3 window exactly as SAM's own get_rel_pos resizes tables.
            ours = relative_position_table(params[key].detach(), 8)
            torch.testing.assert_close(ours, get_rel_pos(8, 8, source[key]))
        else:
            torch.testing.assert_close(params[key].detach(), source[key], rtol=0, atol=0)
    for i, block in enumerate(model.image_encoder.blocks):
        attn = block.attn
        torch.testing.assert_close(attn.rel_pos_d.detach(), 0.5 * (attn.rel_pos_h + attn.rel_pos_w).detach())
        assert attn.rel_pos_d.requires_grad and not attn.rel_pos_h.requires_grad
        assert not attn.qkv.weight.requires_grad and not block.mlp.lin1.weight.requires_grad
        assert block.norm1.weight.requires_grad and block.adapter.linear1.weight.requires_grad
    assert not model.image_encoder.patch_embed.proj.weight.requires_grad
    assert model.image_encoder.patch_embed.slice_merge.weight.requires_grad
    assert not model.image_encoder.pos_embed.requires_grad and model.image_encoder.depth_embed.requires_grad


def test_adapter_split_freezes_exactly_the_reused_sam_weights_except_norms(sam_file):
    model = build_teacher(CFG, num_classes=3, checkpoint=sam_file)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {f"image_encoder.{k}" for k in model.image_encoder.sam_keys() if ".norm" not in k}
    assert frozen == expected
    counts = count_parameters(model)
    assert counts["frozen"] == sum(dict(model.named_parameters())[n].numel() for n in expected)
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())


def test_lora_split_and_lora_starts_as_the_base_model(sam_file):
    model = build_teacher({**CFG, "peft": "lora", "lora_rank": 2}, num_classes=3, checkpoint=sam_file).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(block.adapter is None for block in model.image_encoder.blocks)
    assert {n for n in trainable if "image_encoder.blocks" in n} == {
        n for n, _ in model.named_parameters() if ".lora." in n or n.endswith("rel_pos_d")
    }
    assert not any("norm1" in n or "qkv" in n for n in trainable)
    assert model.image_encoder.blocks[0].attn.lora.a_q.weight.shape == (2, 64)

    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        with_lora = model(image)
        loras = [block.attn.lora for block in model.image_encoder.blocks]
        for block in model.image_encoder.blocks:
            block.attn.lora = None
        base = model(image)
        torch.testing.assert_close(with_lora, base)  # B = 0: LoRA adds nothing at init
        for block, lora in zip(model.image_encoder.blocks, loras):
            block.attn.lora = lora
            torch.nn.init.normal_(lora.b_v.weight)
        assert not torch.allclose(model(image), base)  # ...and does once B moves


def test_without_checkpoint_the_whole_model_trains_and_a_warning_says_so():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = build_teacher(CFG, num_classes=3)
    assert count_parameters(model)["frozen"] == 0
    with pytest.warns(UserWarning):
        lora = build_teacher({**CFG, "peft": "lora"}, num_classes=3)
    assert count_parameters(lora)["frozen"] == 0


def test_wrong_size_checkpoint_names_key_and_shapes(tmp_path, sam_file):
    with pytest.raises(SamCheckpointError, match=r"image_encoder\.patch_embed\.proj\.weight has shape \(64, 3, 16, 16\).*\(128, 3, 16, 16\)"):
        build_teacher({**CFG, "arch": {"embed_dim": 128, "num_heads": 4}}, num_classes=3, checkpoint=sam_file)
    deeper = sam_state_dict(depth=6)
    with pytest.raises(SamCheckpointError, match="blocks.4"):
        load_sam_state_dict(deeper, build_teacher_quiet())
    partial_state = {k: v for k, v in sam_state_dict().items() if "blocks.2.mlp" not in k}
    with pytest.raises(SamCheckpointError, match=r"missing 4 SAM keys.*blocks\.2\.mlp"):
        load_sam_state_dict(partial_state, build_teacher_quiet())
    with pytest.raises(SamCheckpointError, match="not found"):
        load_sam_state_dict(tmp_path / "nope.pth", build_teacher_quiet())


def build_teacher_quiet():
    from teacher.build import teacher_from_config

    return teacher_from_config(CFG, 3)


def test_teacher_pt_round_trip_restores_weights_split_and_meta(tmp_path, sam_file):
    model = build_teacher(CFG, num_classes=3, checkpoint=sam_file).eval()
    with torch.no_grad():
        model.decoder.cls[-1].weight.add_(0.1)  # a "trained" decoder
    meta = {"labels": {0: "background", 1: "liver", 2: "spleen"}, "roi_size": [16, 16, 16], "step": 7,
            "preprocess": {"spacing_mm": [4.0, 4.0, 4.0]}, "best_dice": 0.5}
    path = save_teacher(tmp_path / "teacher.pt", model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt"]  # atomic: no temp file left

    loaded, loaded_meta = load_teacher(path)
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image))
    assert loaded_meta["labels"] == meta["labels"] and loaded_meta["step"] == 7 and loaded_meta["num_classes"] == 3
    assert loaded_meta["teacher_cfg"]["arch"] == CFG["arch"]
    assert count_parameters(loaded) == count_parameters(model)

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherCheckpointError, match="broken.pt"):
        load_teacher(tmp_path / "broken.pt")


def test_a_teacher_built_from_an_arch_alone_round_trips(tmp_path):
    from teacher import Teacher3D, TeacherArch

    arch = TeacherArch(embed_dim=32, depth=4, num_heads=2, sam_img_size=256, neck_dim=32, decoder_dim=16,
                       prompt_heads=4, prompt_mlp_dim=64, roi_size=(16, 16, 16))
    model = Teacher3D(arch, num_classes=2, peft="lora", lora_rank=3).eval()
    loaded, meta = load_teacher(save_teacher(tmp_path / "t.pt", model, {"step": 0}))
    assert loaded.arch == arch and loaded.peft == "lora" and loaded.lora_rank == 3
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image))
