"""Pairwise similarity of class names, used to weight the vision-centric regulariser."""

import logging
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TEXT_TOWER = "text_tower"


class NameSimilarity:
    """Cosine similarity of class names in a language model's embedding space.

    The source is either this model's own text tower (``"text_tower"``: raw names, no prompt
    template, no gradient) or a sentence-transformers model given by a local path or a name
    (the release uses all-MiniLM-L6-v2). A sentence model is loaded on first use and its
    embeddings are cached per name, because its weights never change during training.
    """

    def __init__(self, source: str = TEXT_TOWER):
        if not source:
            raise ValueError(
                "MODEL.SKYSENSE_O.LOSS.NAME_SIMILARITY is empty; use 'text_tower' or the path "
                "of a sentence-transformers model"
            )
        self.source = source
        self._sentence_model = None
        self._cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, names: Sequence[str], backbone) -> torch.Tensor:
        """Return the T x T cosine similarity of ``names`` on the backbone's device."""
        device = next(backbone.parameters()).device
        if self.source == TEXT_TOWER:
            embeddings = backbone.encode_text(backbone.tokenize(list(names))).float()
        else:
            embeddings = self._sentence_embeddings(names)
        embeddings = F.normalize(embeddings.to(device), dim=-1)
        return embeddings @ embeddings.transpose(0, 1)

    def _sentence_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        missing = [name for name in dict.fromkeys(names) if name not in self._cache]
        if missing:
            model = self._load_sentence_model()
            encoded = model.encode(missing, convert_to_tensor=True).float().cpu()
            self._cache.update(zip(missing, encoded))
        return torch.stack([self._cache[name] for name in names])

    def _load_sentence_model(self):
        if self._sentence_model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise ImportError(
                    f"MODEL.SKYSENSE_O.LOSS.NAME_SIMILARITY={self.source!r} needs the "
                    "sentence-transformers package: pip install sentence-transformers "
                    "(or set it to 'text_tower')"
                ) from error
            logger.info("loading sentence model %s for name similarity", self.source)
            self._sentence_model = SentenceTransformer(self.source, device="cpu")
        return self._sentence_model
