"""Class-name embeddings from prompt templates, with an LRU cache for inference."""

import logging
import weakref
from collections import OrderedDict
from typing import Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .backbone.base import VisionLanguageBackbone

logger = logging.getLogger(__name__)

ENSEMBLE_MODES = ("mean", "channels")


class CacheInfo(NamedTuple):
    """Statistics of the text-embedding cache."""

    hits: int
    misses: int
    entries: int
    max_entries: int


def check_templates(templates: Sequence[str]) -> Tuple[str, ...]:
    """Check that every template has exactly one "{}" and return the templates as a tuple."""
    if isinstance(templates, str) or not templates:
        raise ValueError(
            f"prompt templates must be a non-empty list of strings, got {templates!r}"
        )
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"prompt template {template!r} is a {type(template).__name__}, not str")
        if template.count("{}") != 1:
            raise ValueError(
                f"prompt template {template!r} must contain exactly one '{{}}', the place of the "
                "class name"
            )
    return tuple(templates)


def _check_count(value: int, name: str, *, minimum: int) -> int:
    """Check that ``value`` is an integer of at least ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


class TextEmbedder:
    """Embed class names with prompt templates through a backbone's text tower.

    Each class name is put into every template, the prompts are encoded and L2-normalised,
    and the templates are either averaged per class ("mean") or kept as prompt channels
    ("channels"). When no gradient is needed, results are kept in an LRU cache keyed on the
    class names, the templates, the ensemble mode, the identity and version counter of every
    text-tower parameter, the device and the dtype. Loading a state dict or an optimizer step
    changes the version counters, so cached embeddings never outlive the weights they came
    from.

    NOTE: writes through ``parameter.data`` do not change the version counter, so call
    ``clear_cache`` after modifying text weights that way.
    """

    @configurable
    def __init__(
        self,
        *,
        templates: Sequence[str],
        ensemble: str = "mean",
        chunk_size: int = 128,
        cache_entries: int = 8,
    ):
        """
        Args:
            templates: prompt templates, each with exactly one "{}" for the class name.
            ensemble: "mean" (one prompt channel: the re-normalised mean of the normalised
                template embeddings) or "channels" (one channel per template).
            chunk_size: prompts encoded per text-tower forward when no gradient is needed.
            cache_entries: vocabularies kept in the cache, 0 to disable it.
        """
        self.templates = check_templates(templates)
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(
                f"invalid MODEL.SKYSENSE_O.TEXT.ENSEMBLE {ensemble!r}, expected one of "
                f"{', '.join(ENSEMBLE_MODES)}"
            )
        self.ensemble = ensemble
        self.chunk_size = _check_count(chunk_size, "MODEL.SKYSENSE_O.TEXT.CHUNK_SIZE", minimum=1)
        self.cache_entries = _check_count(
            cache_entries, "MODEL.SKYSENSE_O.TEXT.CACHE_ENTRIES", minimum=0
        )
        self._cache: "OrderedDict[Hashable, Tuple[torch.Tensor, List[weakref.ref]]]" = OrderedDict()
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_config(cls, cfg) -> dict:
        node = cfg.MODEL.SKYSENSE_O.TEXT
        return {
            "templates": list(node.TEMPLATES),
            "ensemble": node.ENSEMBLE,
            "chunk_size": node.CHUNK_SIZE,
            "cache_entries": node.CACHE_ENTRIES,
        }

    @property
    def num_prompt_channels(self) -> int:
        """P, the number of prompt channels that ``embed`` returns per class."""
        return 1 if self.ensemble == "mean" else len(self.templates)

    def cache_info(self) -> CacheInfo:
        """Return the hit and miss counts and the size of the cache."""
        return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_entries)

    def clear_cache(self) -> None:
        """Drop every cached embedding but keep the hit and miss counts."""
        self._cache.clear()

    def embed(
        self,
        backbone: VisionLanguageBackbone,
        class_names: Sequence[str],
        *,
        templates: Optional[Sequence[str]] = None,
    ) -> torch.Tensor:
        """Encode ``class_names`` into L2-normalised embeddings, using the cache when possible.

        Args:
            backbone: the backbone whose text tower encodes the prompts.
            class_names: T class names.
            templates: prompt templates for this call only, instead of the configured ones.

        Returns:
            T x P x E embeddings on the backbone's device, with P = 1 for ensemble "mean" and
            P = number of templates for "channels". With gradients enabled and a trainable text
            tower, the result is connected to the text weights and is not cached.
        """
        class_names = self._check_class_names(class_names)
        templates = self.templates if templates is None else check_templates(templates)
        text_parameters = list(backbone.text_parameters())
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in text_parameters)
        if needs_grad:
            return self._encode(backbone, class_names, templates)

        # Callers get a copy, so that an in-place change of the result never alters the cache.
        key = self._cache_key(class_names, templates, text_parameters)
        cached = self._cache_lookup(key)
        if cached is not None:
            return cached.clone()
        with torch.no_grad():
            embeddings = self._encode(backbone, class_names, templates)
        self._cache_store(key, embeddings, text_parameters)
        return embeddings.clone()

    @staticmethod
    def _check_class_names(class_names: Sequence[str]) -> Tuple[str, ...]:
        if isinstance(class_names, str):
            raise TypeError(
                f"class names must be a sequence of strings, got the string {class_names!r}"
            )
        if len(class_names) == 0:
            raise ValueError("the class-name list is empty. Give at least one class name.")
        for name in class_names:
            if not isinstance(name, str):
                raise TypeError(f"class name {name!r} is a {type(name).__name__}, not str")
        return tuple(class_names)

    def _encode(
        self,
        backbone: VisionLanguageBackbone,
        class_names: Tuple[str, ...],
        templates: Tuple[str, ...],
    ) -> torch.Tensor:
        """Encode every (class, template) prompt, CHUNK_SIZE prompts per forward."""
        # Prompts are class-major: the P templates of class 0, then those of class 1, ...
        prompts = [template.replace("{}", name) for name in class_names for template in templates]
        chunks = []
        for start in range(0, len(prompts), self.chunk_size):
            token_ids = backbone.tokenize(prompts[start : start + self.chunk_size])
            chunks.append(backbone.encode_text(token_ids))
        # (T * P) x E -> T x P x E, normalised per prompt.
        embeddings = torch.cat(chunks).reshape(len(class_names), len(templates), -1)
        embeddings = F.normalize(embeddings, dim=-1)
        if self.ensemble == "mean":
            embeddings = F.normalize(embeddings.mean(dim=1, keepdim=True), dim=-1)
        return embeddings

    def _cache_key(
        self,
        class_names: Tuple[str, ...],
        templates: Tuple[str, ...],
        text_parameters: List[torch.Tensor],
    ) -> Hashable:
        if not text_parameters:
            raise ValueError(
                "the backbone returned no text parameters, so its embeddings cannot be cached"
            )
        weights = tuple((id(p), p._version) for p in text_parameters)
        first = text_parameters[0]
        return (class_names, templates, self.ensemble, weights, first.device, first.dtype)

    def _cache_lookup(self, key: Hashable) -> Optional[torch.Tensor]:
        if self.cache_entries == 0:
            return None
        entry = self._cache.get(key)
        # A parameter id can be reused after its tensor is freed, so an entry only counts
        # while every parameter it was computed from is still alive.
        if entry is not None and all(ref() is not None for ref in entry[1]):
            self._cache.move_to_end(key)
            self._hits += 1
            return entry[0]
        if entry is not None:
            del self._cache[key]
        self._misses += 1
        return None

    def _cache_store(
        self, key: Hashable, embeddings: torch.Tensor, text_parameters: List[torch.Tensor]
    ) -> None:
        if self.cache_entries == 0:
            return
        self._cache[key] = (embeddings, [weakref.ref(p) for p in text_parameters])
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
