"""The SkySense-O meta-architecture: backbone, text embeddings, decoder, losses and inference."""

import contextlib
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from .backbone.base import VisionLanguageBackbone, build_vl_backbone
from .decoder.base import SegmentationDecoder, build_decoder
from .inference import (
    WINDOW_BLENDS,
    RowResizer,
    bilinear_argmax,
    blend_rows_with_view,
    expand_with_synonyms,
    merge_synonym_scores,
    padded_length,
    score_downsample_factor,
    sliding_window_scores,
)
from .losses import (
    SkySenseOCriterion,
    graph_weight_matrix,
    region_features_pixel_shuffle,
    region_features_pooled,
)
from .name_similarity import NameSimilarity
from .text_embeddings import TextEmbedder

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("whole", "sliding")
OUTPUT_KINDS = ("probabilities", "labels")
REGION_POOLING_MODES = ("embedding", "pixel_shuffle")
AMP_DTYPES = ("", "bfloat16", "float16")


def _check_choice(key: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; expected one of {tuple(allowed)}")


def check_config_choices(cfg) -> None:
    """Raise ValueError naming the first SkySenseO key whose value is not one of its choices.

    Entry points call this before they create output folders or build the model, so that a
    typo ends with one line. The model checks the same values when it is built directly.
    """
    node = cfg.MODEL.SKYSENSE_O
    _check_choice("MODEL.SKYSENSE_O.INFERENCE.MODE", node.INFERENCE.MODE, INFERENCE_MODES)
    _check_choice("MODEL.SKYSENSE_O.INFERENCE.OUTPUT", node.INFERENCE.OUTPUT, OUTPUT_KINDS)
    _check_choice("MODEL.SKYSENSE_O.INFERENCE.WINDOW_BLEND", node.INFERENCE.WINDOW_BLEND,
                  WINDOW_BLENDS)
    _check_choice("MODEL.SKYSENSE_O.INFERENCE.AMP_DTYPE", node.INFERENCE.AMP_DTYPE, AMP_DTYPES)
    _check_choice("MODEL.SKYSENSE_O.LOSS.REGION_POOLING", node.LOSS.REGION_POOLING,
                  REGION_POOLING_MODES)


class SkySenseOHead(nn.Module):
    """Holds the vision-language backbone and the decoder.

    The attribute names ``clip_model`` and ``transformer`` give parameter names
    ``sem_seg_head.clip_model.*`` and ``sem_seg_head.transformer.*``, the layout of the
    released checkpoints.
    """

    def __init__(self, clip_model: VisionLanguageBackbone, transformer: SegmentationDecoder):
        super().__init__()
        self.clip_model = clip_model
        self.transformer = transformer


def _guidance_adapter(in_channels: int, out_channels: int, ratio: int) -> nn.Module:
    """Project a guidance map to ``out_channels`` and upsample it by ``ratio`` (1, 2, 4, ...).

    With ratio 1 this is the release's 1x1 convolution; a ViT's single-scale maps need a
    transposed convolution to reach the finer strides the decoder expects.
    """
    if ratio == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1)
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=ratio, stride=ratio)


def _resize(scores: torch.Tensor, size) -> torch.Tensor:
    """Resize T x H x W scores bilinearly to ``size``.

    Channels that are constant over the map, such as the classes a decoder left out above its
    class budget, are filled with their value instead of interpolated. Interpolating a
    constant gives that constant, and with thousands of classes the resize would otherwise
    dominate the inference time.
    """
    size = tuple(size)
    if tuple(scores.shape[-2:]) == size:
        return scores
    flat = scores.flatten(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    if not bool(constant.any()):
        return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    # One broadcast copy writes every channel at memory speed, which a masked assignment does
    # not. The few varying channels are then overwritten with their resize.
    resized = scores.new_empty(scores.shape[0], *size)
    resized.copy_(flat[:, :1, None].expand(-1, *size))
    varying = torch.nonzero(~constant).squeeze(1)
    if varying.numel():
        resized.index_copy_(0, varying, F.interpolate(
            scores[varying][None], size=size, mode="bilinear", align_corners=False)[0])
    return resized


@META_ARCH_REGISTRY.register()
class SkySenseO(nn.Module):
    """Open-vocabulary semantic segmentation with a CLIP-style backbone and a cost-volume decoder.

    Training inputs (from the "skysa_semantic" mapper) carry ``image`` (uint8 3 x H x W),
    ``sem_seg`` (H x W indices into ``texts``) and ``texts`` (a different list per image is
    allowed). Inference inputs carry ``image``, ``height``, ``width``, ``texts`` and
    optionally ``synonyms``; the output is ``[{"sem_seg": T x height x width probabilities}]``.
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: SkySenseOHead,
        visual_guidance_conv1: nn.Module,
        visual_guidance_conv2: nn.Module,
        text_embedder: TextEmbedder,
        criterion: SkySenseOCriterion,
        name_similarity: Optional[NameSimilarity],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        image_size: int,
        inference_mode: str = "whole",
        keep_aspect_ratio: bool = False,
        window: int = 384,
        stride: int = 256,
        global_weight: float = 0.0,
        window_batch: int = 4,
        window_blend: str = "uniform",
        retrieval_augmentation: bool = False,
        amp_dtype: str = "",
        output: str = "probabilities",
        region_pooling: str = "embedding",
        pixel_shuffle_upscale: int = 16,
        graph_file: str = "",
        train_datasets: Sequence[str] = (),
    ):
        """
        Args:
            sem_seg_head: the backbone and the decoder.
            visual_guidance_conv1, visual_guidance_conv2: project the backbone's coarse and fine
                guidance maps to the decoder's guidance channels.
            text_embedder: turns class names into cached, normalised prompt embeddings.
            criterion: the training losses.
            name_similarity: class-name similarity for the regulariser (None when it is off).
            pixel_mean, pixel_std: per-channel normalisation, RGB in 0..255.
            size_divisibility: images are padded to a multiple of this.
            image_size: side of the square image given to the backbone.
            inference_mode: "whole" or "sliding"; the remaining arguments configure them.
            output: "probabilities" (each image's "sem_seg" is T x H x W class probabilities)
                or "labels" (an H x W int64 map of the top class, computed without the
                T x H x W volume).
            graph_file: the visual-relevance graph used to weight the regulariser for images
                whose names were sampled from it; when empty, the graph of the first training
                dataset (its metadata), as the training mapper resolves it.
            train_datasets: the training datasets, to find their graph.
        """
        super().__init__()
        _check_choice("MODEL.SKYSENSE_O.INFERENCE.MODE", inference_mode, INFERENCE_MODES)
        _check_choice("MODEL.SKYSENSE_O.LOSS.REGION_POOLING", region_pooling,
                      REGION_POOLING_MODES)
        _check_choice("MODEL.SKYSENSE_O.INFERENCE.WINDOW_BLEND", window_blend, WINDOW_BLENDS)
        _check_choice("MODEL.SKYSENSE_O.INFERENCE.OUTPUT", output, OUTPUT_KINDS)
        _check_choice("MODEL.SKYSENSE_O.INFERENCE.AMP_DTYPE", amp_dtype, AMP_DTYPES)
        self.sem_seg_head = sem_seg_head
        self.visual_guidance_conv1 = visual_guidance_conv1
        self.visual_guidance_conv2 = visual_guidance_conv2
        self.text_embedder = text_embedder
        self.criterion = criterion
        self.name_similarity = name_similarity
        self.size_divisibility = size_divisibility
        self.image_size = image_size
        self.inference_mode = inference_mode
        self.keep_aspect_ratio = keep_aspect_ratio
        self.window = window
        self.stride = stride
        self.global_weight = global_weight
        self.window_batch = window_batch
        self.window_blend = window_blend
        self.retrieval_augmentation = retrieval_augmentation
        self.amp_dtype = amp_dtype
        self.output = output
        self.region_pooling = region_pooling
        self.pixel_shuffle_upscale = pixel_shuffle_upscale
        self.graph_file = graph_file
        self.train_datasets = tuple(train_datasets)
        if region_pooling == "pixel_shuffle":
            embed_dim = self.backbone.embed_dim
            upscale = pixel_shuffle_upscale
            self.pixel_shuffle_conv0 = nn.Conv2d(embed_dim, embed_dim * upscale * upscale, 1)
            self.pixel_shuffle_conv1 = nn.Conv2d(embed_dim, embed_dim, 1)
        self.register_buffer("clip_pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("clip_pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.SKYSENSE_O
        backbone = build_vl_backbone(cfg)
        backbone.set_finetune(node.BACKBONE.VISUAL_FINETUNE, node.BACKBONE.TEXT_FINETUNE)
        decoder = build_decoder(cfg, backbone)
        coarse_channels, fine_channels = node.DECODER.GUIDANCE_CHANNELS
        stride = backbone.dense_stride
        ratios = []
        for target, source in ((stride // 2, backbone.guidance_strides[0]),
                               (stride // 4, backbone.guidance_strides[1])):
            if source % target != 0:
                raise ValueError(
                    f"backbone guidance stride {source} cannot be upsampled to stride {target}"
                )
            ratios.append(source // target)
        loss = node.LOSS
        criterion = SkySenseOCriterion(
            pixel_weight=loss.PIXEL_WEIGHT,
            region_contrast_weight=loss.REGION_CONTRAST_WEIGHT,
            regular_weight=loss.REGULAR_WEIGHT,
            contrast_scale=loss.CONTRAST_SCALE,
            ignore_value=loss.IGNORE_VALUE,
            ignore_as_negative=loss.IGNORE_AS_NEGATIVE,
        )
        name_similarity = None
        if loss.REGULAR_WEIGHT > 0:
            name_similarity = NameSimilarity(loss.NAME_SIMILARITY)
        mean = cfg.MODEL.PIXEL_MEAN
        std = cfg.MODEL.PIXEL_STD
        inference = node.INFERENCE
        return {
            "sem_seg_head": SkySenseOHead(backbone, decoder),
            "visual_guidance_conv1": _guidance_adapter(
                backbone.guidance_channels[0], coarse_channels, ratios[0]),
            "visual_guidance_conv2": _guidance_adapter(
                backbone.guidance_channels[1], fine_channels, ratios[1]),
            "text_embedder": TextEmbedder(cfg),
            "criterion": criterion,
            "name_similarity": name_similarity,
            "pixel_mean": mean,
            "pixel_std": std,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "image_size": node.BACKBONE.IMAGE_SIZE,
            "inference_mode": inference.MODE,
            "keep_aspect_ratio": inference.KEEP_ASPECT_RATIO,
            "window": inference.WINDOW,
            "stride": inference.STRIDE,
            "global_weight": inference.GLOBAL_WEIGHT,
            "window_batch": inference.WINDOW_BATCH,
            "window_blend": inference.WINDOW_BLEND,
            "retrieval_augmentation": inference.RETRIEVAL_AUGMENTATION,
            "amp_dtype": inference.AMP_DTYPE,
            "output": inference.OUTPUT,
            "region_pooling": loss.REGION_POOLING,
            "pixel_shuffle_upscale": loss.PIXEL_SHUFFLE_UPSCALE,
            "graph_file": cfg.DATASETS.SKYSA.GRAPH_FILE,
            "train_datasets": cfg.DATASETS.TRAIN,
        }

    @property
    def backbone(self) -> VisionLanguageBackbone:
        return self.sem_seg_head.clip_model

    @property
    def decoder(self) -> SegmentationDecoder:
        return self.sem_seg_head.transformer

    @property
    def device(self) -> torch.device:
        return self.clip_pixel_mean.device

    # ---- shared steps ------------------------------------------------------------------------

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Map a uint8 (or float 0..255) 3 x H x W image to the backbone's normalised input."""
        return (image.to(self.device, torch.float32) - self.clip_pixel_mean) / self.clip_pixel_std

    def encode_images(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the image tower on B x 3 x S x S images.

        Returns:
            (dense embedding B x E x h x w, decoder guidance [appearance, coarse, fine]).
        """
        features = self.backbone.encode_dense(images)
        coarse, fine = features.guidance
        guidance = [
            features.embedding,
            self.visual_guidance_conv1(coarse),
            self.visual_guidance_conv2(fine),
        ]
        return features.embedding, guidance

    def decode(
        self,
        embedding: torch.Tensor,
        guidance: List[torch.Tensor],
        text_embeds: Sequence[torch.Tensor],
    ) -> List[torch.Tensor]:
        """Decode each image with its own class list.

        Args:
            embedding: B x E x h x w; guidance: as returned by ``encode_images``.
            text_embeds: per image, T_i x P x E normalised embeddings.

        Returns:
            Per image, T_i x 4h x 4w logits.
        """
        if len({tuple(t.shape) for t in text_embeds}) == 1:
            stacked = torch.stack(list(text_embeds))
            return list(self.decoder(embedding, stacked, guidance))
        outputs = []
        for index, texts in enumerate(text_embeds):
            single = [g[index : index + 1] for g in guidance]
            outputs.append(self.decoder(embedding[index : index + 1], texts[None], single)[0])
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        """Return losses in training and per-image probability maps in inference."""
        if self.training:
            return self.forward_train(batched_inputs)
        with self._autocast():
            return [self.inference_single(inputs) for inputs in batched_inputs]

    def _autocast(self):
        if not self.amp_dtype:
            return contextlib.nullcontext()
        dtype = getattr(torch, self.amp_dtype)
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ---- training ----------------------------------------------------------------------------

    def forward_train(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        for inputs in batched_inputs:
            if "sem_seg" not in inputs or "texts" not in inputs:
                raise KeyError(
                    "training inputs need 'sem_seg' and 'texts'; use the 'skysa_semantic' "
                    "dataset mapper (INPUT.DATASET_MAPPER_NAME)"
                )

        # Normalise, pad and bring the batch to the backbone's square input.
        images = ImageList.from_tensors(
            [self.normalize(x["image"]) for x in batched_inputs], self.size_divisibility
        ).tensor
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs], self.size_divisibility,
            pad_value=self.criterion.ignore_value,
        ).tensor
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear",
                                   align_corners=False)
        embedding, guidance = self.encode_images(images)

        # Encode every distinct name of the batch once, then gather each image's list.
        texts = [list(x["texts"]) for x in batched_inputs]
        vocabulary = sorted({name for names in texts for name in names})
        index_of = {name: i for i, name in enumerate(vocabulary)}
        vocabulary_embeds = self.text_embedder.embed(self.backbone, vocabulary)
        text_embeds = [vocabulary_embeds[[index_of[n] for n in names]] for names in texts]

        logits = self.decode(embedding, guidance, text_embeds)
        logits = [
            F.interpolate(l[None], size=targets.shape[-2:], mode="bilinear",
                          align_corners=False)[0]
            for l in logits
        ]
        region_features, name_similarity, graph_weights = self._auxiliary_inputs(
            batched_inputs, embedding, targets, texts
        )
        return self.criterion(
            logits, list(targets), region_features,
            [t.mean(dim=1) for t in text_embeds], name_similarity, graph_weights,
        )

    def _auxiliary_inputs(self, batched_inputs, embedding, targets, texts):
        count = len(batched_inputs)
        if not self.criterion.uses_region_losses:
            return [None] * count, [None] * count, [None] * count
        ignore = self.criterion.ignore_value
        regions = []
        for index, names in enumerate(texts):
            if self.region_pooling == "pixel_shuffle":
                regions.append(region_features_pixel_shuffle(
                    embedding[index], targets[index], len(names), ignore,
                    self.pixel_shuffle_conv0, self.pixel_shuffle_conv1,
                    self.pixel_shuffle_upscale,
                ))
            else:
                regions.append(region_features_pooled(embedding[index], targets[index],
                                                      len(names), ignore))
        similarity = [None] * count
        if self.name_similarity is not None:
            similarity = [self.name_similarity(names, self.backbone) for names in texts]
        graph = self._graph()
        weights = [
            graph_weight_matrix(names, graph.score).to(self.device)
            if graph is not None and x.get("graph_sampled", False) else None
            for names, x in zip(texts, batched_inputs)
        ]
        return regions, similarity, weights

    def _graph(self):
        # Imported here because the data package depends on Detectron2's data catalog, which
        # the model needs only when the regulariser is weighted by a graph.
        from ..data.graph import load_graph, resolve_graph_file

        graph_file = self.graph_file
        if not graph_file and self.train_datasets:
            graph_file = resolve_graph_file(self.train_datasets[0], self.graph_file)
        return load_graph(graph_file) if graph_file else None

    # ---- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def inference_single(self, inputs: Dict) -> Dict[str, torch.Tensor]:
        """Segment one image with its own class list.

        Returns:
            {"sem_seg": T x height x width class probabilities}, or with the "labels" output
            {"sem_seg": height x width int64 indices of the top class}.
        """
        class_names = list(inputs["texts"])
        synonyms = inputs.get("synonyms") if self.retrieval_augmentation else None
        names, synonym_groups = expand_with_synonyms(class_names, synonyms)
        text_embeds = self.text_embedder.embed(self.backbone, names)
        image = self.normalize(inputs["image"])
        height = inputs.get("height", image.shape[-2])
        width = inputs.get("width", image.shape[-1])

        output_size = (height, width)
        if self.output == "labels":
            return {"sem_seg": self.predict_labels(image, text_embeds, synonym_groups, output_size)}
        if self.inference_mode == "sliding":
            scores = self.sliding_scores(image, text_embeds, synonym_groups)
            scores = _resize(scores, output_size)
            if self.global_weight > 0:
                whole = self.whole_scores(image, text_embeds, synonym_groups, output_size)
                scores = (1 - self.global_weight) * scores + self.global_weight * whole
        else:
            scores = self.whole_scores(image, text_embeds, synonym_groups, output_size)
        return {"sem_seg": scores}

    def predict_window_scores(
        self, images: torch.Tensor, text_embeds: torch.Tensor, synonym_groups=None
    ) -> torch.Tensor:
        """Class probabilities of N x 3 x H x W normalised images, at the decoder's resolution.

        Each image is resized to the backbone's square input first.
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear",
                                   align_corners=False)
        embedding, guidance = self.encode_images(images)
        batch_texts = text_embeds[None].expand(images.shape[0], *text_embeds.shape)
        logits = self.decoder(embedding, batch_texts, guidance)
        return merge_synonym_scores(logits.float().sigmoid(), synonym_groups)

    def whole_scores(
        self, image: torch.Tensor, text_embeds, synonym_groups=None, output_size=None
    ) -> torch.Tensor:
        """Predict with the release's protocol: pad, squash (or fit) to one square, map back.

        Returns T x H' x W' probabilities for the 3 x H x W normalised ``image``, at
        ``output_size`` (H', W'), by default (H, W).
        """
        output_size = output_size or tuple(image.shape[-2:])
        return _resize(self.whole_source(image, text_embeds, synonym_groups), output_size)

    def whole_source(self, image: torch.Tensor, text_embeds, synonym_groups=None) -> torch.Tensor:
        """Return the T x h x w probabilities whose bilinear resize to any size is the
        whole-image prediction at that size (see ``whole_scores``)."""
        height, width = image.shape[-2:]
        padded = ImageList.from_tensors([image], self.size_divisibility).tensor
        if not self.keep_aspect_ratio:
            probs = self.predict_window_scores(padded, text_embeds, synonym_groups)[0]
            # As the release does (Detectron2's sem_seg_postprocess): crop with the pre-padding
            # size at the output resolution (a no-op unless the image is smaller than the map),
            # then stretch back.
            return probs[:, :height, :width]

        # Fit the long side to the square, pad the rest, and crop the valid part afterwards.
        scale = self.image_size / max(padded.shape[-2:])
        fitted_size = [max(1, round(side * scale)) for side in padded.shape[-2:]]
        fitted = F.interpolate(padded, size=fitted_size, mode="bilinear", align_corners=False)
        square = fitted.new_zeros(1, 3, self.image_size, self.image_size)
        square[..., : fitted_size[0], : fitted_size[1]] = fitted
        probs = self.predict_window_scores(square, text_embeds, synonym_groups)
        probs = F.interpolate(probs, size=(self.image_size,) * 2, mode="bilinear",
                              align_corners=False)[0]
        valid = [max(1, round(height * scale)), max(1, round(width * scale))]
        return probs[:, : valid[0], : valid[1]]

    def predict_labels(
        self, image: torch.Tensor, text_embeds, synonym_groups, output_size
    ) -> torch.Tensor:
        """Return the H' x W' int64 top class of each pixel at ``output_size`` (H', W').

        The labels are the argmax of the probability output, up to float rounding on
        near-ties, but the T x H' x W' probabilities are never held. Whole-image mode
        interpolates only the classes that can win in each cell (``bilinear_argmax``). Sliding
        mode reduces each finished block of rows to its labels.
        """
        if self.inference_mode == "whole":
            source = self.whole_source(image, text_embeds, synonym_groups)
            return bilinear_argmax(source, output_size)[0]

        labels = torch.empty(output_size, dtype=torch.int64, device=image.device)

        def keep_labels(row_start: int, row_end: int, rows: torch.Tensor) -> None:
            labels[row_start:row_end] = rows.argmax(dim=0)

        emit = keep_labels
        if self.global_weight > 0:
            emit = blend_rows_with_view(self.whole_source(image, text_embeds, synonym_groups),
                                        self.global_weight, output_size, keep_labels)
        self.sliding_rows(image, text_embeds, synonym_groups, RowResizer(
            tuple(image.shape[-2:]), output_size, emit).push)
        return labels

    @property
    def score_side(self) -> int:
        """Side of the score map the decoder predicts for one backbone input (4 x the grid)."""
        return 4 * (self.image_size // self.backbone.dense_stride)

    def sliding_downsample(self) -> int:
        """Return the factor by which the sliding window keeps its averaged scores below full size."""
        return score_downsample_factor(self.window, self.stride, self.score_side)

    def sliding_scores(self, image: torch.Tensor, text_embeds, synonym_groups=None) -> torch.Tensor:
        """Average class probabilities over overlapping windows.

        Returns T x H x W probabilities at the size of ``image`` (3 x H x W, normalised).
        """
        height, width = image.shape[-2:]
        num_classes = len(synonym_groups) if synonym_groups else text_embeds.shape[0]
        canvas = torch.empty(num_classes, height, width, device=image.device)
        next_row = 0

        def store(rows: torch.Tensor) -> None:
            nonlocal next_row
            canvas[:, next_row : next_row + rows.shape[1]] = rows
            next_row += rows.shape[1]

        self.sliding_rows(image, text_embeds, synonym_groups, store)
        return canvas

    def sliding_rows(
        self, image: torch.Tensor, text_embeds, synonym_groups, push_rows: Callable
    ) -> None:
        """Pass the window-averaged T x rows x W probabilities of ``image`` to ``push_rows``
        in consecutive blocks of rows, top to bottom, without holding the T x H x W volume."""
        height, width = image.shape[-2:]
        factor = self.sliding_downsample()
        padded = F.pad(image[None], (0, padded_length(width, self.window, factor) - width,
                                     0, padded_length(height, self.window, factor) - height))
        num_classes = len(synonym_groups) if synonym_groups else text_embeds.shape[0]
        cell = self.window // factor

        def predict(crops: torch.Tensor) -> torch.Tensor:
            probs = self.predict_window_scores(crops, text_embeds, synonym_groups)
            if probs.shape[-2:] == (cell, cell):
                return probs
            return F.interpolate(probs, size=(cell, cell), mode="bilinear", align_corners=False)

        def collect(row_start: int, row_end: int, rows: torch.Tensor) -> None:
            # Rows and columns past the image are padding.
            row_end = min(row_end, height)
            if row_end > row_start:
                push_rows(rows[:, : row_end - row_start, :width])

        sliding_window_scores(
            padded, predict, num_classes=num_classes, window=self.window, stride=self.stride,
            batch_size=self.window_batch, emit_rows=collect, score_downsample=factor,
            blend=self.window_blend,
        )
