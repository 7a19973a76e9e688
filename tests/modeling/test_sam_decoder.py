"""Tests of the SAM-style mask decoder: shapes, chunking, memory, zero-shot prior, training."""

import math
from types import SimpleNamespace
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from torch.overrides import TorchFunctionMode

from skysense_o import add_skysense_o_config
from skysense_o.modeling.decoder import DECODER_REGISTRY, SAMMaskDecoder, build_decoder

EMBED_DIM = 32
GUIDANCE_CHANNELS = (16, 8)
HEIGHT, WIDTH = 12, 17


def make_decoder(class_chunk: int = 16, seed: int = 0, class_budget=None) -> SAMMaskDecoder:
    torch.manual_seed(seed)
    return SAMMaskDecoder(
        embed_dim=EMBED_DIM,
        guidance_channels=GUIDANCE_CHANNELS,
        hidden_dim=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        upsample_dims=(16, 8),
        class_chunk=class_chunk,
        class_budget=class_budget,
    )


def make_inputs(
    batch: int, num_classes: int, prompts: int = 1, size: Tuple[int, int] = (HEIGHT, WIDTH), seed=1
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Random image embeddings, normalised text embeddings and guidance of matching shapes."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    image = torch.randn(batch, EMBED_DIM, height, width, generator=generator)
    text = torch.randn(batch, num_classes, prompts, EMBED_DIM, generator=generator)
    coarse = torch.randn(batch, GUIDANCE_CHANNELS[0], 2 * height, 2 * width, generator=generator)
    fine = torch.randn(batch, GUIDANCE_CHANNELS[1], 4 * height, 4 * width, generator=generator)
    return image, F.normalize(text, dim=-1), [image, coarse, fine]


def upsampled_cost(image: torch.Tensor, text: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The B x T x H x W cosine similarity to the prompt-ensembled classes, resized to ``size``."""
    class_embeds = F.normalize(text.mean(dim=2), dim=-1)
    cost = torch.einsum("behw,bte->bthw", F.normalize(image, dim=1), class_embeds)
    return F.interpolate(cost, size=size, mode="bilinear", align_corners=False)


# ---- Shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 5, 300])
def test_output_shape(batch, num_classes):
    decoder = make_decoder()
    image, text, guidance = make_inputs(batch, num_classes)
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    assert logits.shape == (batch, num_classes, 4 * HEIGHT, 4 * WIDTH)
    assert torch.isfinite(logits).all()


def test_registered_under_its_name():
    assert DECODER_REGISTRY.get("SAMMaskDecoder") is SAMMaskDecoder


def test_prompt_channels_ensembled():
    # P prompt channels act as one class embedding: their normalised mean.
    decoder = make_decoder()
    image, text, guidance = make_inputs(2, 6, prompts=3)
    ensembled = F.normalize(text.mean(dim=2, keepdim=True), dim=-1)
    with torch.no_grad():
        from_channels = decoder(image, text, guidance)
        from_mean = decoder(image, ensembled, guidance)
    torch.testing.assert_close(from_channels, from_mean, rtol=1e-5, atol=1e-4)


# ---- Chunks of classes --------------------------------------------------------------------


def test_single_chunk_independent_of_chunk_size():
    image, text, guidance = make_inputs(2, 40)
    with torch.no_grad():
        exact_fit = make_decoder(class_chunk=40)(image, text, guidance)
        larger = make_decoder(class_chunk=512)(image, text, guidance)
    torch.testing.assert_close(exact_fit, larger, rtol=0, atol=0)


def within_chunks_order() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.cat([start + torch.randperm(8, generator=generator) for start in (0, 8, 16)])


def swapped_chunks_order() -> torch.Tensor:
    return torch.cat([torch.arange(16, 24), torch.arange(8, 16), torch.arange(0, 8)])


def any_order() -> torch.Tensor:
    return torch.randperm(24, generator=torch.Generator().manual_seed(3))


# A class's logits depend on the classes of its own chunk as a set, and on other chunks only
# through the dense prior, which does not depend on the order of classes. So reordering classes
# inside chunks, or moving whole chunks, reorders the output the same way.
@pytest.mark.parametrize(
    "class_chunk, make_order",
    [(8, within_chunks_order), (8, swapped_chunks_order), (24, any_order)],
    ids=["within chunks", "whole chunks", "unchunked"],
)
def test_class_order_permutes_output(class_chunk, make_order):
    decoder = make_decoder(class_chunk=class_chunk)
    image, text, guidance = make_inputs(2, 24)
    order = make_order()
    assert not torch.equal(order, torch.arange(24))
    with torch.no_grad():
        logits = decoder(image, text, guidance)
        permuted = decoder(image, text[:, order], guidance)
    torch.testing.assert_close(permuted, logits[:, order], rtol=1e-5, atol=1e-4)


def test_chunk_membership_changes_mask_logits():
    # Classes attend to each other only inside a chunk, so the chunk size matters once T
    # exceeds it. The hypernetwork is re-initialised to make the mask logits large.
    image, text, guidance = make_inputs(1, 24)
    logits = []
    for class_chunk in (8, 24):
        decoder = make_decoder(class_chunk=class_chunk)
        decoder.hypernet.layers[-1].reset_parameters()
        with torch.no_grad():
            logits.append(decoder(image, text, guidance))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_cost_term_same_chunked_and_unchunked():
    # With the hypernetwork output zeroed, logits are exactly scale * cosine + bias, whatever
    # the chunking. This checks the cost term's values and its alignment with the output grid.
    image, text, guidance = make_inputs(2, 40)
    expected = upsampled_cost(image, text, (4 * HEIGHT, 4 * WIDTH))
    for class_chunk in (16, 64):
        decoder = make_decoder(class_chunk=class_chunk)
        with torch.no_grad():
            decoder.hypernet.layers[-1].weight.zero_()
            decoder.cost_log_scale.fill_(math.log(7.0))
            decoder.cost_bias.fill_(-0.5)
            logits = decoder(image, text, guidance)
        torch.testing.assert_close(logits, 7.0 * expected - 0.5, rtol=1e-5, atol=1e-4)


# ---- Memory -------------------------------------------------------------------------------


class TensorSizeRecorder(TorchFunctionMode):
    """Record the largest tensor and the total bytes of the tensors that torch functions return."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.total_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for output in outputs:
            if isinstance(output, torch.Tensor):
                self.max_numel = max(self.max_numel, output.numel())
                self.total_bytes += output.numel() * output.element_size()
        return result


# A small grid, so that a term quadratic in T (the K x K token self-attention) would outgrow the
# terms linear in T (the B x T x 4h x 4w logits) at T = 512.
MEMORY_GRID = (3, 4)


def record_forward(decoder: SAMMaskDecoder, num_classes: int) -> TensorSizeRecorder:
    image, text, guidance = make_inputs(1, num_classes, size=MEMORY_GRID)
    recorder = TensorSizeRecorder()
    with torch.no_grad(), recorder:
        decoder(image, text, guidance)
    return recorder


def test_memory_linear_in_classes():
    decoder = make_decoder(class_chunk=64)
    small, large = record_forward(decoder, 64), record_forward(decoder, 512)
    class_ratio = 512 / 64

    # Linear growth gives at most the class ratio (8), and quadratic growth would give 64.
    assert large.max_numel / small.max_numel <= class_ratio
    assert large.total_bytes / small.total_bytes <= class_ratio
    assert large.total_bytes / small.total_bytes > 2.0

    # The largest tensor is the output itself.
    height, width = MEMORY_GRID
    assert large.max_numel == 512 * (4 * height) * (4 * width)


def test_memory_measure_detects_quadratic_growth():
    # Without chunking, the 512 x 512 token self-attention dominates, and the recorder shows it.
    decoder = make_decoder(class_chunk=512)
    small, large = record_forward(decoder, 64), record_forward(decoder, 512)
    assert large.max_numel / small.max_numel > 30
    assert large.total_bytes / small.total_bytes > 12


# ---- Class budget -------------------------------------------------------------------------


def best_cost(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The B x T maximum over cells of the cosine similarity to the prompt-ensembled classes."""
    return upsampled_cost(image, text, image.shape[-2:]).amax(dim=(2, 3))


def test_class_budget_decodes_top_classes():
    decoder = make_decoder(class_budget=4)
    image, text, guidance = make_inputs(2, 10)
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    assert logits.shape == (2, 10, 4 * HEIGHT, 4 * WIDTH)
    top_classes = best_cost(image, text).topk(4, dim=1).indices.sort(dim=1).values
    # The two images keep different classes, so the selection is made per image.
    assert not torch.equal(top_classes[0], top_classes[1])

    unbudgeted = make_decoder()
    for index in range(2):
        dropped = torch.ones(10, dtype=torch.bool)
        dropped[top_classes[index]] = False
        assert torch.all(logits[index, dropped] == -100.0)
        # Kept classes decode as if the vocabulary held only them, in vocabulary order.
        kept_text = text[index : index + 1, top_classes[index]]
        single = [g[index : index + 1] for g in guidance]
        with torch.no_grad():
            expected = unbudgeted(image[index : index + 1], kept_text, single)
        torch.testing.assert_close(logits[index : index + 1, top_classes[index]], expected)


def test_class_budget_not_reached_changes_nothing():
    image, text, guidance = make_inputs(2, 10)
    with torch.no_grad():
        budgeted = make_decoder(class_budget=10)(image, text, guidance)
        unbudgeted = make_decoder()(image, text, guidance)
    assert torch.equal(budgeted, unbudgeted)


def test_class_budget_bounds_transformer_tokens():
    decoder = make_decoder(class_chunk=16, class_budget=24)
    token_counts = []
    decoder.transformer.register_forward_hook(
        lambda module, args, output: token_counts.append(args[2].shape[1])
    )
    image, text, guidance = make_inputs(1, 300)
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    # 24 decoded classes in chunks of 16, out of 300.
    assert token_counts == [16, 8]
    assert (logits != -100.0).flatten(2).any(dim=2).sum() == 24


def test_class_budget_from_config():
    cfg = small_cfg()
    cfg.MODEL.SKYSENSE_O.DECODER.CLASS_BUDGET = 5
    assert build_decoder(cfg, STUB_BACKBONE).class_budget == 5
    assert make_decoder().class_budget is None


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_class_budget_invalid(budget):
    message = rf"CLASS_BUDGET\) must be a positive integer, got {budget}"
    with pytest.raises(ValueError, match=message):
        make_decoder(class_budget=budget)


# ---- Zero-shot prior ----------------------------------------------------------------------


def test_untrained_argmax_follows_cost_on_regions():
    # Four classes own the four quadrants: each cell's embedding is its class's text
    # direction plus noise, so the cost volume has a clear per-region argmax.
    decoder = make_decoder()
    generator = torch.Generator().manual_seed(11)
    text = F.normalize(torch.randn(1, 4, 1, EMBED_DIM, generator=generator), dim=-1)
    region = torch.zeros(HEIGHT, WIDTH, dtype=torch.long)
    region[: HEIGHT // 2, WIDTH // 2 :] = 1
    region[HEIGHT // 2 :, : WIDTH // 2] = 2
    region[HEIGHT // 2 :, WIDTH // 2 :] = 3
    image = text[0, region, 0].permute(2, 0, 1).unsqueeze(0)  # 1 x E x h x w
    image = image + 0.3 * torch.randn(image.shape, generator=generator)
    _, _, guidance = make_inputs(1, 4)
    guidance[0] = image
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    cost = upsampled_cost(image, text, logits.shape[-2:])
    assert torch.equal(logits.argmax(dim=1), cost.argmax(dim=1))
    upsampled_region = region.repeat_interleave(4, 0).repeat_interleave(4, 1)
    agreement = (logits.argmax(dim=1)[0] == upsampled_region).float().mean()
    assert agreement > 0.9


def test_untrained_argmax_follows_cost_on_random_features():
    decoder = make_decoder()
    image, text, guidance = make_inputs(2, 20)
    with torch.no_grad():
        logits = decoder(image, text, guidance)
    cost = upsampled_cost(image, text, logits.shape[-2:])
    agreement = (logits.argmax(dim=1) == cost.argmax(dim=1)).float().mean()
    assert agreement > 0.999


# ---- Training -----------------------------------------------------------------------------


def test_gradients_reach_all_parameters():
    decoder = make_decoder(class_chunk=4)
    image, text, guidance = make_inputs(2, 10)
    logits = decoder(image, text, guidance)
    target = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    F.binary_cross_entropy_with_logits(logits, target).backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_training_steps_reduce_loss():
    # Each cell of random features is one of three random class prototypes plus noise. The
    # text embeddings are unrelated to the prototypes, so the decoder must learn which is which.
    decoder = make_decoder()
    height, width = 6, 7
    _, text, guidance = make_inputs(2, 3, size=(height, width))
    generator = torch.Generator().manual_seed(4)
    prototypes = torch.randn(3, EMBED_DIM, generator=generator)
    cell_labels = torch.randint(0, 3, (2, height, width), generator=generator)
    noise = torch.randn(2, EMBED_DIM, height, width, generator=generator)
    image = prototypes[cell_labels].permute(0, 3, 1, 2) + 0.5 * noise
    guidance[0] = image
    labels = cell_labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    target = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()

    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(decoder(image, text, guidance), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # Below the loss of the best constant prediction (probability 1/3 everywhere), so the
    # decoder has learned which prototype belongs to which class token.
    constant_loss = -(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3
    assert losses[-1] < 0.9 * constant_loss


# ---- Config and bad input -----------------------------------------------------------------


def small_cfg():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    decoder_cfg = cfg.MODEL.SKYSENSE_O.DECODER
    decoder_cfg.NAME = "SAMMaskDecoder"
    decoder_cfg.GUIDANCE_CHANNELS = list(GUIDANCE_CHANNELS)
    decoder_cfg.HIDDEN_DIM = 32
    decoder_cfg.UPSAMPLE_DIMS = [16, 8]
    decoder_cfg.SAM_DEPTH = 3
    decoder_cfg.SAM_NUM_HEADS = 2
    decoder_cfg.SAM_MLP_DIM = 48
    decoder_cfg.SAM_CLASS_CHUNK = 7
    return cfg


STUB_BACKBONE = SimpleNamespace(embed_dim=EMBED_DIM, dense_stride=16)


def test_build_from_config():
    decoder = build_decoder(small_cfg(), STUB_BACKBONE)
    assert isinstance(decoder, SAMMaskDecoder)
    assert decoder.class_chunk == 7
    assert decoder.transformer.depth == 3
    assert decoder.transformer.num_heads == 2
    assert decoder.transformer.mlp_dim == 48
    assert decoder.transformer.embedding_dim == 32
    assert decoder.upscale_fine.out_channels == 8
    image, text, guidance = make_inputs(1, 9)
    with torch.no_grad():
        assert decoder(image, text, guidance).shape == (1, 9, 4 * HEIGHT, 4 * WIDTH)


def test_build_from_default_config():
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.MODEL.SKYSENSE_O.DECODER.NAME = "SAMMaskDecoder"
    decoder = build_decoder(cfg, STUB_BACKBONE)
    assert decoder.transformer.embedding_dim == cfg.MODEL.SKYSENSE_O.DECODER.HIDDEN_DIM
    assert decoder.guidance_channels == tuple(cfg.MODEL.SKYSENSE_O.DECODER.GUIDANCE_CHANNELS)
    assert decoder.class_chunk == cfg.MODEL.SKYSENSE_O.DECODER.SAM_CLASS_CHUNK


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("HIDDEN_DIM", 34, r"HIDDEN_DIM\) = 34 must be a multiple of 2 x num_heads"),
        ("SAM_NUM_HEADS", 0, r"SAM_NUM_HEADS\) must be a positive integer, got 0"),
        ("SAM_CLASS_CHUNK", 0, r"SAM_CLASS_CHUNK\) must be a positive integer, got 0"),
        ("SAM_DEPTH", -1, r"SAM_DEPTH\) must be a positive integer, got -1"),
        ("UPSAMPLE_DIMS", [64], r"UPSAMPLE_DIMS\) must contain two values, got \[64\]"),
        ("GUIDANCE_CHANNELS", [16, 0], r"GUIDANCE_CHANNELS\)\[1\] must be a positive"),
    ],
)
def test_invalid_config_raises(key, value, message):
    cfg = small_cfg()
    cfg.MODEL.SKYSENSE_O.DECODER[key] = value
    with pytest.raises(ValueError, match=message):
        build_decoder(cfg, STUB_BACKBONE)


def test_backbone_without_embed_dim_raises():
    with pytest.raises(TypeError, match="embed_dim attribute, got a SimpleNamespace"):
        build_decoder(small_cfg(), SimpleNamespace(dense_stride=16))


def bad_inputs():
    """Yield (name, image, text, guidance, expected message) for each broken contract."""
    image, text, guidance = make_inputs(2, 5)
    yield "embed width", image[:, :16], text, guidance, r"image_embeds must be B x 32 x h x w"
    yield "text batch", image, text[:1], guidance, r"text_embeds must be 2 x T x P x 32"
    yield "no classes", image, text[:, :0], guidance, r"at least one class.*\(2, 0, 1, 32\)"
    yield "two maps", image, text, guidance[:2], "got 2 maps"
    coarse = guidance[1][..., :-1]
    yield "coarse size", image, text, [image, coarse, guidance[2]], r"coarse guidance.*33\)"
    fine = guidance[2][:, :4]
    yield "fine channels", image, text, [image, guidance[1], fine], r"fine guidance.*\(2, 4,"


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda case: case[0])
def test_invalid_inputs_raise(case):
    _, image, text, guidance, message = case
    with pytest.raises(ValueError, match=message):
        make_decoder()(image, text, guidance)
