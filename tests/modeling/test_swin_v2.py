"""Tests of the Swin-V2 image tower against the release's test vectors and its quirks."""

import json

import pytest
import torch

from skysense_o.modeling.backbone.swin_v2 import (
    SWIN_V2_ARCHS,
    PatchMerging,
    SwinTransformerV2,
    relative_coords_table,
    relative_position_index,
    resolve_swin_v2_arch,
    shifted_window_mask,
)
from skysense_o.utils.weights import load_state_dict_checked

# Tolerance for image features, from the test vectors' README.
IMAGE_ATOL = 5e-4

TINY_ARCH = {"embed_dims": 12, "depths": [2, 2, 2, 2], "num_heads": [2, 4, 8, 16],
             "extra_norm_every_n_blocks": 2}


def _tiny_swin(**kwargs) -> SwinTransformerV2:
    return SwinTransformerV2(arch=TINY_ARCH, window_sizes=(8, 8, 8, 16),
                             pretrained_window_sizes=(0, 0, 0, 8), **kwargs)


@pytest.fixture(scope="module")
def swin_vectors(refspec_dir):
    return torch.load(refspec_dir / "vectors" / "swin_v2_tiny.pt", weights_only=True)


def test_swin_tiny_matches_vectors(swin_vectors):
    kwargs = json.loads(swin_vectors["config"])["constructor_kwargs"]
    assert kwargs["use_abs_pos_embed"] is False
    assert kwargs["pad_small_map"] is False
    model = SwinTransformerV2(
        arch=kwargs["arch"], window_sizes=kwargs["window_size"],
        pretrained_window_sizes=kwargs["pretrained_window_sizes"],
        patch_size=kwargs["patch_size"], in_channels=kwargs["in_channels"],
        drop_path_rate=kwargs["drop_path_rate"],
    )
    missing, unexpected = load_state_dict_checked(
        model, swin_vectors["state_dict"], ignore_missing=model.recomputed_buffer_keys()
    )
    assert missing == [] and unexpected == []
    model.eval()

    with torch.no_grad():
        outputs = model(swin_vectors["input"].float())

    assert len(outputs) == 4
    for index, output in enumerate(outputs):
        expected = swin_vectors["output"][f"stage{index}"]
        assert output.shape == expected.shape
        torch.testing.assert_close(output, expected, atol=IMAGE_ATOL, rtol=0)


def test_stored_coords_tables_equal_computed(swin_vectors):
    model = _tiny_swin()
    buffers = dict(model.named_buffers())
    for key, value in swin_vectors["state_dict"].items():
        if key.endswith("relative_coords_table"):
            assert torch.equal(buffers[key], value), key


def test_real_config_buffers(refspec_dir):
    stored = torch.load(refspec_dir / "vectors" / "buffers_real_config.pt", weights_only=True)

    assert torch.equal(relative_coords_table(8, 0), stored["swin_w8_relative_coords_table"])
    assert torch.equal(relative_coords_table(16, 8), stored["swin_w16_pt8_relative_coords_table"])
    assert torch.equal(relative_position_index(8), stored["swin_w8_relative_position_index"])
    assert torch.equal(relative_position_index(16), stored["swin_w16_relative_position_index"])
    assert relative_position_index(16).dtype == torch.int64


def test_real_config_buffers_in_modules(refspec_dir):
    stored = torch.load(refspec_dir / "vectors" / "buffers_real_config.pt", weights_only=True)
    model = _tiny_swin()
    first = model.stages[0].blocks[0].attn.w_msa
    last = model.stages[3].blocks[1].attn.w_msa

    assert torch.equal(first.relative_coords_table, stored["swin_w8_relative_coords_table"])
    assert torch.equal(last.relative_coords_table, stored["swin_w16_pt8_relative_coords_table"])
    assert torch.equal(last.relative_position_index, stored["swin_w16_relative_position_index"])


def test_relative_position_index_small_window():
    # Window 2: tokens (0,0), (0,1), (1,0), (1,1); table side 3.
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)


def test_arch_table_variants():
    assert SWIN_V2_ARCHS["tiny"]["depths"] == [2, 2, 6, 2]
    assert SWIN_V2_ARCHS["huge"] == {"embed_dims": 352, "depths": [2, 2, 18, 2],
                                     "num_heads": [8, 16, 32, 64],
                                     "extra_norm_every_n_blocks": 6}
    assert SWIN_V2_ARCHS["giant"]["depths"] == [2, 2, 42, 4]
    assert resolve_swin_v2_arch("HUGE")["embed_dims"] == 352
    assert resolve_swin_v2_arch(TINY_ARCH) == TINY_ARCH


def test_arch_rejects_bad_values():
    with pytest.raises(ValueError, match="'enormous'"):
        resolve_swin_v2_arch("enormous")
    with pytest.raises(ValueError, match="embed_dims"):
        resolve_swin_v2_arch({"embed_dims": 12, "depths": [2, 2]})
    with pytest.raises(ValueError, match="same length"):
        resolve_swin_v2_arch({**TINY_ARCH, "num_heads": [2, 4]})
    with pytest.raises(TypeError, match="int"):
        resolve_swin_v2_arch(12)


def test_window_sizes_need_one_per_stage():
    with pytest.raises(ValueError, match="window_sizes"):
        SwinTransformerV2(arch=TINY_ARCH, window_sizes=(8, 8, 8))


def test_extra_norm_positions():
    with torch.device("meta"):
        model = SwinTransformerV2(arch="huge")
    has_norm3 = [(s, b) for s, stage in enumerate(model.stages)
                 for b, block in enumerate(stage.blocks) if block.norm3 is not None]
    assert has_norm3 == [(2, 5), (2, 11), (2, 17)]


def test_small_image_rejected():
    model = _tiny_swin()
    assert model.min_input_size() == 241
    with pytest.raises(ValueError, match="224x224.*at least 241"):
        model(torch.zeros(1, 3, 224, 224))


def test_wrong_channel_count_rejected():
    with pytest.raises(ValueError, match=r"\(1, 4, 256, 256\)"):
        _tiny_swin()(torch.zeros(1, 4, 256, 256))


def test_feature_sizes_and_strides():
    model = _tiny_swin()
    assert model.channels == [12, 24, 48, 96]
    assert model.strides == [4, 8, 16, 16]
    assert model.feature_sizes(272, 304) == [(68, 76), (34, 38), (17, 19), (17, 19)]
    assert model.feature_sizes(270, 301) == [(68, 76), (34, 38), (17, 19), (17, 19)]


def test_patch_merging_is_channel_major():
    merge = PatchMerging(2, 8)
    merge.norm = torch.nn.Identity()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(8))
    # 2 x 2 map with channels (c0, c1) = (10·row + col, 100 + 10·row + col).
    tokens = torch.tensor([[[0.0, 100.0], [1.0, 101.0], [10.0, 110.0], [11.0, 111.0]]])

    merged, out_shape = merge(tokens, (2, 2))

    assert out_shape == (1, 1)
    expected = torch.tensor([0.0, 1.0, 10.0, 11.0, 100.0, 101.0, 110.0, 111.0])
    assert torch.equal(merged[0, 0], expected)


def test_keep_resolution_merge_repeats_channels():
    merge = PatchMerging(2, 8, keep_resolution=True)
    merge.norm = torch.nn.Identity()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(8))
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])

    merged, out_shape = merge(tokens, (1, 2))

    assert out_shape == (1, 2)
    assert torch.equal(merged[0, 0], torch.tensor([1.0] * 4 + [2.0] * 4))
    assert torch.equal(merged[0, 1], torch.tensor([3.0] * 4 + [4.0] * 4))


def test_patch_merging_pads_odd_sizes():
    merge = PatchMerging(3, 6)
    merged, out_shape = merge(torch.randn(2, 5 * 7, 3), (5, 7))
    assert out_shape == (3, 4)
    assert merged.shape == (2, 12, 6)


def test_shifted_window_mask_regions():
    mask = shifted_window_mask((8, 8), window_size=4, shift_size=2, device=torch.device("cpu"))

    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # The top-left window lies in one region; the bottom-right one holds four.
    assert torch.all(mask[0] == 0)
    region_sizes = (mask[3] == 0).sum(dim=1)
    assert torch.all(region_sizes == 4)


def test_load_ignores_stored_buffer_copies():
    source, target = _tiny_swin(), _tiny_swin()
    state = source.state_dict()
    corrupted = {key: (torch.zeros_like(value) if "relative_" in key else value)
                 for key, value in state.items()}
    target.load_state_dict(corrupted, strict=True)

    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key

    without_buffers = {key: value for key, value in state.items() if "relative_" not in key}
    result = target.load_state_dict(without_buffers, strict=True)
    assert result.missing_keys == []


def test_recomputed_buffer_keys():
    keys = _tiny_swin().recomputed_buffer_keys(prefix="visual.")
    assert len(keys) == 16
    assert "visual.stages.3.blocks.1.attn.w_msa.relative_position_index" in keys


def test_meta_build_then_assign_load_runs():
    source = _tiny_swin().eval()
    with torch.device("meta"):
        target = _tiny_swin()
    target.load_state_dict(source.state_dict(), assign=True)
    target.eval()
    images = torch.randn(1, 3, 256, 256)

    with torch.no_grad():
        expected, actual = source(images), target(images)

    for a, b in zip(actual, expected):
        assert torch.equal(a, b)


def test_drop_path_inactive_in_eval():
    plain = _tiny_swin().eval()
    dropped = _tiny_swin(drop_path_rate=0.5).eval()
    dropped.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(plain(images), dropped(images)):
            assert torch.equal(a, b)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = _tiny_swin().train()
    checkpointed = _tiny_swin(with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 256, 256)

    for model in (plain, checkpointed):
        sum(output.square().mean() for output in model(images)).backward()

    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
