"""Text tokenisation: a thin wrapper over open_clip's tokenizers with a configurable context length.

The tiny CPU model of the default recipe uses a short context (32 tokens); the GPU recipes use
open_clip's default of 77. Only tokenizers that ship with open_clip (the CLIP BPE vocabulary)
work offline; Hugging Face tokenizers named by a model config would need a download.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_CONTEXT_LENGTH = 77
"""CLIP's text context length (token positions), used when none is given."""


class Tokenizer:
    """Callable turning captions into padded token ids.

    Args:
        context_length: number of token positions L (texts are truncated to fit, keeping the
            end-of-text token).
        model_name: an open_clip model name whose tokenizer to use; ``None`` or ``"simple"``
            selects open_clip's CLIP BPE ``SimpleTokenizer`` (bundled, no download).

    Example:
        >>> tok = Tokenizer(context_length=32)
        >>> tok(["a photo of a dress."]).shape
        torch.Size([1, 32])
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, model_name: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.context_length = int(context_length)
        self.model_name = model_name or "simple"
        if self.model_name == "simple":
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=self.context_length)
        else:
            import open_clip

            config = open_clip.get_model_config(self.model_name)
            if config is None:  # open_clip would fall back to the CLIP BPE without a word
                raise ValueError(f"unknown tokenizer {self.model_name!r}: 'simple' (the bundled CLIP BPE) or an "
                                 "open_clip model name whose tokenizer ships with open_clip (e.g. ViT-B-32)")
            hf = (config.get("text_cfg") or {}).get("hf_tokenizer_name")
            if hf:
                raise ValueError(f"tokenizer {self.model_name!r} is the Hugging Face tokenizer {hf!r}, which needs a "
                                 "download; use 'simple' or a model whose tokenizer ships with open_clip")
            self._tok = open_clip.get_tokenizer(self.model_name, context_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary (49408 for the CLIP BPE)."""
        enc = getattr(self._tok, "encoder", None)
        if enc is not None:
            return len(enc)
        return int(getattr(self._tok, "vocab_size"))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenise.

        Args:
            texts: one caption or a sequence of N captions.

        Returns:
            LongTensor (N, L) of token ids, zero-padded (N = 1 for a single string).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = self._tok(list(texts))
        return out.long()

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, model_name={self.model_name!r})"


def get_tokenizer(model_name: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """Build a [`Tokenizer`][amortize.data.tokenizer.Tokenizer].

    Args:
        model_name: open_clip model name, or ``None``/``"simple"`` for the bundled CLIP BPE.
        context_length: token positions L.

    Returns:
        A callable mapping N captions to a LongTensor (N, L).
    """
    return Tokenizer(context_length=context_length, model_name=model_name)
