"""Training losses of SkySense-O: pixel BCE, region-text contrast and the vision-centric regulariser.

The formulas follow the SkySense-O paper (Zhu et al., "SkySense-O: Towards Open-World Remote
Sensing Interpretation with Vision-Centric Visual-Language Modeling", CVPR 2025) as released,
with two deliberate changes that the options below can undo for exact reproduction:

* ignored pixels are left out of the pixel loss (the release counts them as negatives of every
  class, see ``ignore_as_negative``);
* region features are pooled from the dense embedding at its own resolution with area-resized
  masks, instead of through the release's 268M-parameter pixel-shuffle upsampler (see
  ``region_features_pixel_shuffle`` for the release's path).
"""

import logging
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def one_hot_targets(targets: torch.Tensor, num_classes: int, ignore_value: int) -> torch.Tensor:
    """Return the T x H x W float one-hot of an H x W label; ignored pixels are all zero."""
    valid = targets != ignore_value
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    if valid.any() and int(safe[valid].max()) >= num_classes:
        raise ValueError(
            f"label value {int(safe[valid].max())} is outside the {num_classes} class names of "
            "this image"
        )
    one_hot = F.one_hot(safe.long(), num_classes).permute(2, 0, 1).to(torch.float32)
    return one_hot * valid.unsqueeze(0)


def pixel_bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_value: int,
    *,
    ignore_as_negative: bool = False,
) -> torch.Tensor:
    """Binary cross-entropy with logits over every class of every labelled pixel.

    Args:
        logits: T x H x W class logits of one image, at the label's resolution.
        targets: H x W class indices into the T classes; ``ignore_value`` marks unlabelled pixels.
        ignore_value: the label value to skip.
        ignore_as_negative: count ignored pixels as negatives of every class, as the release
            does, instead of leaving them out.

    Returns:
        The mean loss over the counted pixel-class pairs (0 when no pixel is labelled).
    """
    num_classes = logits.shape[0]
    one_hot = one_hot_targets(targets, num_classes, ignore_value)
    elementwise = F.binary_cross_entropy_with_logits(logits.float(), one_hot, reduction="none")
    if ignore_as_negative:
        return elementwise.mean()
    valid = (targets != ignore_value).to(elementwise.dtype)
    count = valid.sum() * num_classes
    if count == 0:
        return logits.sum() * 0.0
    return (elementwise * valid.unsqueeze(0)).sum() / count


def region_features_pooled(
    dense_embedding: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_value: int
) -> torch.Tensor:
    """Pool the dense embedding inside each class's mask, at the embedding's resolution.

    Args:
        dense_embedding: E x h x w image embedding.
        targets: H x W class indices (any size; masks are area-resized to h x w).

    Returns:
        T x E L2-normalised region features; classes absent from the label give zero rows.
    """
    one_hot = one_hot_targets(targets, num_classes, ignore_value)
    # Area resizing turns each binary mask into the fraction of every embedding cell that the
    # class covers, so the pooled feature is a coverage-weighted mean of the cells.
    coverage = F.adaptive_avg_pool2d(one_hot.unsqueeze(0), dense_embedding.shape[-2:])[0]
    weights = coverage.flatten(1).to(dense_embedding.dtype)  # T x (h*w)
    pooled = weights @ dense_embedding.flatten(1).transpose(0, 1)  # T x E
    return F.normalize(pooled, dim=-1)


def region_features_pixel_shuffle(
    dense_embedding: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    ignore_value: int,
    conv0: nn.Module,
    conv1: nn.Module,
    upscale: int,
) -> torch.Tensor:
    """Compute the release's region features: upsample the embedding with conv0, a pixel
    shuffle and conv1 to the label's resolution, then sum it inside each class's mask and
    normalise.

    Only needed to reproduce the release's losses; ``region_features_pooled`` is the default.
    """
    one_hot = one_hot_targets(targets, num_classes, ignore_value)
    upsampled = conv1(F.pixel_shuffle(conv0(dense_embedding.unsqueeze(0)), upscale))[0]
    if upsampled.shape[-2:] != targets.shape:
        raise ValueError(
            f"pixel-shuffled features are {tuple(upsampled.shape[-2:])} but the label is "
            f"{tuple(targets.shape)}; the release's region path needs crops of "
            "embedding size x upscale"
        )
    pooled = one_hot.flatten(1).to(upsampled.dtype) @ upsampled.flatten(1).transpose(0, 1)
    return F.normalize(pooled, dim=-1)


def region_text_similarity(region_features: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Return the T x T region-text cosine matrix, min-max normalised over the whole matrix."""
    similarity = region_features @ F.normalize(text_embeds, dim=-1).transpose(0, 1)
    low, high = similarity.min(), similarity.max()
    return (similarity - low) / (high - low).clamp_min(torch.finfo(similarity.dtype).eps)


def region_contrast_loss(
    similarity: torch.Tensor, present: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """BCE with logits between the normalised region-text matrix and the identity of present
    classes: a region should match its own class name and no other.

    Args:
        similarity: T x T output of ``region_text_similarity``.
        present: T booleans, the classes that occur in the label.
        scale: multiplies the [0, 1] similarities before they are used as logits; 1 is the
            release's formula.
    """
    target = torch.diag(present.to(similarity.dtype))
    return F.binary_cross_entropy_with_logits(similarity * scale, target)


def regularization_loss(
    similarity: torch.Tensor,
    name_similarity: torch.Tensor,
    graph_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The vision-centric regulariser: the mean absolute off-diagonal value of
    ``similarity * name_similarity [* graph_weights]``.

    Region-text pairs of different classes whose names are close in language space are
    penalised, so that the visual space separates them; with a graph, the weight
    ``11 - score`` makes visually unrelated pairs (low score) count more than related ones.
    """
    weighted = similarity * name_similarity.to(similarity.dtype)
    if graph_weights is not None:
        weighted = weighted * graph_weights.to(similarity.dtype)
    num_classes = weighted.shape[0]
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=weighted.device)
    return weighted[off_diagonal].abs().mean()


def graph_weight_matrix(names: Sequence[str], score_fn) -> torch.Tensor:
    """Return W with W[i, j] = 11 - score(names[i], names[j]), or 0 where the pair is absent.

    ``score_fn(a, b)`` returns an integer score from 1 to 10, or None when the graph has no
    edge from a to b.
    """
    weights = torch.zeros(len(names), len(names))
    for i, source in enumerate(names):
        for j, target in enumerate(names):
            score = score_fn(source, target)
            if score is not None:
                weights[i, j] = 11 - score
    return weights


class SkySenseOCriterion(nn.Module):
    """Combines the three losses for a batch of images with per-image class lists.

    The auxiliary (region) losses need at least two classes present in a crop; for a crop with
    fewer they contribute zero. ``auxiliary_crops`` counts the crops seen while those losses
    are on and ``skipped_auxiliary`` the crops among them that contributed zero, so that a run
    where they rarely apply can be noticed (the trainer reports both).
    """

    def __init__(
        self,
        *,
        pixel_weight: float,
        region_contrast_weight: float,
        regular_weight: float,
        contrast_scale: float,
        ignore_value: int,
        ignore_as_negative: bool = False,
    ):
        super().__init__()
        self.pixel_weight = pixel_weight
        self.region_contrast_weight = region_contrast_weight
        self.regular_weight = regular_weight
        self.contrast_scale = contrast_scale
        self.ignore_value = ignore_value
        self.ignore_as_negative = ignore_as_negative
        self.auxiliary_crops = 0
        self.skipped_auxiliary = 0

    @property
    def uses_region_losses(self) -> bool:
        return self.region_contrast_weight > 0 or self.regular_weight > 0

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        region_features: Sequence[Optional[torch.Tensor]],
        text_embeds: Sequence[torch.Tensor],
        name_similarity: Sequence[Optional[torch.Tensor]],
        graph_weights: Sequence[Optional[torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Compute the weighted losses, averaged over the images of the batch.

        Args (one entry per image):
            logits: T_i x H x W logits at the label's resolution.
            targets: H x W labels indexing the image's T_i names.
            region_features: T_i x E normalised region features (None when the region losses
                are off).
            text_embeds: T_i x E text embeddings of the image's names.
            name_similarity: T_i x T_i cosine similarity of the names (None when off).
            graph_weights: T_i x T_i graph weights, or None when the names were not sampled
                from a graph.

        Returns:
            {"loss_sem_seg", "loss_region_contrast", "loss_regularization"}.
        """
        pixel_terms, contrast_terms, regular_terms = [], [], []
        for index, (image_logits, target) in enumerate(zip(logits, targets)):
            pixel_terms.append(
                pixel_bce_loss(image_logits, target, self.ignore_value,
                               ignore_as_negative=self.ignore_as_negative)
            )
            zero = image_logits.sum() * 0.0
            present = self._present_classes(target, image_logits.shape[0])
            computable = int(present.sum()) >= 2
            if self.uses_region_losses:
                self.auxiliary_crops += 1
                self.skipped_auxiliary += int(not computable)
            if not self.uses_region_losses or not computable:
                contrast_terms.append(zero)
                regular_terms.append(zero)
                continue
            similarity = region_text_similarity(region_features[index], text_embeds[index])
            contrast_terms.append(region_contrast_loss(similarity, present, self.contrast_scale))
            regular_terms.append(
                regularization_loss(similarity, name_similarity[index], graph_weights[index])
            )
        return {
            "loss_sem_seg": self.pixel_weight * torch.stack(pixel_terms).mean(),
            "loss_region_contrast": self.region_contrast_weight * torch.stack(contrast_terms).mean(),
            "loss_regularization": self.regular_weight * torch.stack(regular_terms).mean(),
        }

    def _present_classes(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        valid = target[target != self.ignore_value].long()
        counts = torch.bincount(valid, minlength=num_classes)[:num_classes]
        return counts > 0
