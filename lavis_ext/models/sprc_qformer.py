"""SPRC's Q-Former: LAVIS's BLIP-2 Q-Former with the two behaviour changes SPRC's checkpoints rely on.

SPRC (Bai et al., "Sentence-level Prompts Benefit Composed Image Retrieval", ICLR 2024) ships an edited copy
of LAVIS's ``Qformer.py``. Its weights are the same modules, but two forward rules differ, and a released
SPRC checkpoint only scores as published with both:

1. ``no_img`` prompt insertion: the learnable prompt tokens are placed right after ``[CLS]`` (not before
   the text) and receive position embeddings, like text tokens.
2. The query feed-forward (``intermediate_query``/``output_query``) is used for query positions only when
   image cross-attention is present; an image-free pass sends every position through the text
   feed-forward (upstream uses the query branch whenever queries are present).

Rather than copying the file, :func:`to_sprc_qformer` converts a LAVIS ``BertLMHeadModel`` in place by
re-classing three modules to the subclasses below. No parameter is added or renamed, so the state dict keys
stay LAVIS's (and SPRC's).
"""

from __future__ import annotations

import torch
from lavis.models.blip2_models.Qformer import BertEmbeddings, BertLayer, BertLMHeadModel, BertModel

__all__ = ["SprcBertEmbeddings", "SprcBertLayer", "SprcBertModel", "to_sprc_qformer"]


class SprcBertEmbeddings(BertEmbeddings):
    """Embeddings with SPRC's ``no_img`` layout: ``[CLS] prompts text[1:]``, positions over all of them."""

    prompt_after_cls = False

    def forward(self, input_ids=None, position_ids=None, query_embeds=None, past_key_values_length=0):
        if not (self.prompt_after_cls and input_ids is not None and query_embeds is not None):
            return super().forward(input_ids, position_ids, query_embeds, past_key_values_length)
        seq_length = input_ids.size(1) + query_embeds.size(1)
        if position_ids is None:
            position_ids = self.position_ids[:, past_key_values_length : seq_length + past_key_values_length]
        words = self.word_embeddings(input_ids)
        embeddings = torch.cat([words[:, :1], query_embeds, words[:, 1:]], dim=1)
        if self.position_embedding_type == "absolute":
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class SprcBertLayer(BertLayer):
    """Query feed-forward only under image cross-attention (SPRC's change 2)."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        output_attentions=False,
        query_length=0,
    ):
        if encoder_hidden_states is None:
            query_length = 0
        return super().forward(
            hidden_states,
            attention_mask,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            past_key_value,
            output_attentions,
            query_length,
        )


class SprcBertModel(BertModel):
    """LAVIS's Q-Former BERT whose ``forward`` also takes SPRC's ``no_img`` flag."""

    def forward(self, *args, no_img: bool = False, **kwargs):
        if not no_img:
            return super().forward(*args, **kwargs)
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError(
                "no_img=True is SPRC's image-free prompt pass; do not pass encoder_hidden_states"
            )
        self.embeddings.prompt_after_cls = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.embeddings.prompt_after_cls = False


def to_sprc_qformer(qformer: BertLMHeadModel) -> BertLMHeadModel:
    """Turn LAVIS's Q-Former into SPRC's in place (same parameters, SPRC's two forward rules)."""
    if not isinstance(qformer, BertLMHeadModel):
        raise TypeError(
            f"to_sprc_qformer expects lavis.models.blip2_models.Qformer.BertLMHeadModel, got {type(qformer)}"
        )
    qformer.bert.__class__ = SprcBertModel
    qformer.bert.embeddings.__class__ = SprcBertEmbeddings
    for layer in qformer.bert.encoder.layer:
        layer.__class__ = SprcBertLayer
    return qformer
