"""SPRC's composed-image-retrieval model (``blip2_cir_align_prompt``) as a LAVIS model, plus gated fusion.

Bai et al., "Sentence-level Prompts Benefit Composed Image Retrieval" (ICLR 2024, github chunmeifeng/SPRC).
Submodules, parameter names and shapes are SPRC's, so its released checkpoints load with no missing or
unexpected keys (with ``use_gated_fusion: false``, which is exactly SPRC). Differences from SPRC's file:

- ``forward`` returns ``loss`` (the weighted sum), so LAVIS's ``train_step`` and runner work; SPRC's returns
  only the components and needs its own training script.
- loss weights, gated fusion and cross-rank negatives are config keys, not lines to edit;
- the optional :class:`~lavis_ext.models.gated_fusion.GatedFusion` is applied by the single
  :meth:`_composed_features` used by ``forward`` and by every inference path;
- gallery caching keeps target query features (N x Q x D), not raw ViT tokens (SPRC keeps ~1.45 MB per
  image);
- a ``tiny`` model type (tiny EVA ViT, tiny BERT with a toy-world vocabulary) builds offline.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import all_gather_with_grad
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from torch import nn

from lavis_ext.models import clip_vit_l
from lavis_ext.models.checkpoint_io import read_state_dict
from lavis_ext.models.gated_fusion import GatedFusion
from lavis_ext.models.qformer_lora import apply_qformer_lora, check_lora_config
from lavis_ext.models.sprc_qformer import to_sprc_qformer

__all__ = ["Blip2QformerCirAlignPrompt"]

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

# Config keys read by from_config and the types they accept (bad types fail before anything is built).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "vit_model": (str,),
    "vit_depth": (int,),
    "image_size": (int,),
    "drop_path_rate": (int, float),
    "use_grad_checkpoint": (bool,),
    "vit_precision": (str,),
    "freeze_vit": (bool,),
    "num_query_token": (int,),
    "cross_attention_freq": (int,),
    "embed_dim": (int,),
    "max_txt_len": (int,),
    "loss_rtc": (int, float),
    "loss_align": (int, float),
    "use_gated_fusion": (bool,),
    "gather_negatives": (bool,),
    "bert_base": (str,),
    "tiny_bert": (dict,),
    "tiny_vit": (dict,),
    "lora": (dict,),
}


def _check_config(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key, kinds in _CONFIG_TYPES.items():
        value = values.get(key)
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            accepted = " or ".join(kind.__name__ for kind in kinds)
            raise TypeError(
                f"blip2_cir_align_prompt config key '{key}' must be {accepted}, got {value!r} "
                f"({type(value).__name__})"
            )
    return values


_SIM_PAD = 16


def _round_up(n: int) -> int:
    return -(-n // _SIM_PAD) * _SIM_PAD


def _padded_similarity(query_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
    """One block of :meth:`Blip2QformerCirAlignPrompt.similarity`; zero padding leaves every dot product
    unchanged but gives the matmul no ragged edges, so a score does not depend on the block it is in.

    One GEMM (queries x D) @ (D x targets*Q), then the max over each target's Q columns. Padding copies a
    block only when a size is ragged (real widths, 256 and 32, never are), so the cost is the GEMM's.
    """
    n_queries, n_targets, width = query_feats.size(0), target_feats.size(0), query_feats.size(1)
    n_tokens = target_feats.size(1)
    target_feats = target_feats.to(query_feats.dtype)
    pad_width, pad_rows, pad_targets = (_round_up(n) - n for n in (width, n_queries, n_targets))
    if pad_width or pad_rows:
        query_feats = F.pad(query_feats, (0, pad_width, 0, pad_rows))
    if pad_width or pad_targets:
        target_feats = F.pad(target_feats, (0, pad_width, 0, 0, 0, pad_targets))
    scores = torch.matmul(query_feats, target_feats.reshape(-1, target_feats.size(-1)).T)
    scores = scores.view(query_feats.size(0), target_feats.size(0), n_tokens).amax(-1)
    return scores[:n_queries, :n_targets] if pad_rows or pad_targets else scores


@registry.register_model("blip2_cir_align_prompt")
class Blip2QformerCirAlignPrompt(Blip2Base):
    """BLIP-2 Q-Former composed image retrieval with sentence-level prompts (SPRC), optional gated fusion.

    Model types: ``pretrain`` (EVA ViT-g), ``pretrain_vitL`` (CLIP ViT-L), ``coco`` (BLIP-2 COCO fine-tune),
    ``tiny`` (offline, for tests and the demo).
    """

    # Config keys no default YAML sets (LoRA is off unless a config asks for it); read by the unknown-key check.
    EXTRA_CONFIG_KEYS = ("lora",)

    PRETRAINED_MODEL_CONFIG_DICT = {
        model_type: str(_CONFIG_DIR / f"blip2_cir_align_prompt_{model_type}.yaml")
        for model_type in ("pretrain", "pretrain_vitL", "coco", "tiny")
    }

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        img_size: int = 224,
        drop_path_rate: float = 0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        embed_dim: int = 256,
        max_txt_len: int = 32,
        loss_rtc: float = 0.4,
        loss_align: float = 0.4,
        use_gated_fusion: bool = False,
        gather_negatives: bool = True,
        bert_base: str | None = None,
        tiny_vit: dict | None = None,
        vit_depth: int | None = None,
    ):
        super().__init__()
        self.tokenizer = self._init_tokenizer(bert_base)
        self.visual_encoder, self.ln_vision = self._init_vision(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, tiny_vit, vit_depth
        )
        if freeze_vit:
            for param in self.visual_encoder.parameters():
                param.requires_grad = False
            self.visual_encoder = self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train
            logger.info("freeze vision encoder")
        self.Qformer, self.query_tokens = self._init_qformer(
            bert_base, num_query_token, self.visual_encoder.num_features, cross_attention_freq
        )
        to_sprc_qformer(self.Qformer)
        # mean_resizing=False: the [DEC] row starts from the normal init, as under the transformers 4.26 that
        # BLIP-2 and SPRC were trained with (transformers 5 would start it at the mean embedding).
        self.Qformer.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        state_dict = self.Qformer.state_dict()
        for name, param in self.Qformer.named_parameters():
            if "_query" in name:  # query branches start as copies of the text branches (BLIP-2)
                param.data.copy_(state_dict[name.replace("_query", "")])

        hidden = self.Qformer.config.hidden_size
        max_positions = self.Qformer.config.max_position_embeddings
        if num_query_token + max_txt_len > max_positions:
            raise ValueError(
                f"num_query_token ({num_query_token}) + max_txt_len ({max_txt_len}) must be <= the Q-Former's "
                f"max_position_embeddings ({max_positions}): SPRC's prompt pass gives the prompts positions"
            )
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)  # unused, kept so SPRC checkpoints load without unexpected keys
        # SPRC's losses never use the ITM head or the Q-Former's LM head: frozen, so that DDP (which fails on
        # trainable parameters without a gradient) works and the runner's checkpoints leave them out. The
        # LM decoder's weight is the word embedding table, which does train.
        word_embeddings = self.Qformer.bert.embeddings.word_embeddings.weight
        for param in [*self.itm_head.parameters(), *self.Qformer.cls.parameters()]:
            if param is not word_embeddings:
                param.requires_grad = False
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = max_txt_len
        self.prompt_tokens = nn.Parameter(torch.zeros(1, num_query_token, hidden))
        self.prompt_tokens.data.normal_(mean=0.0, std=self.Qformer.config.initializer_range)

        self.loss_rtc_weight = float(loss_rtc)
        self.loss_align_weight = float(loss_align)
        self.gather_negatives = gather_negatives
        self.gated_fusion = (
            GatedFusion(self.visual_encoder.num_features, hidden) if use_gated_fusion else None
        )
        self._warned_truncation = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def _init_tokenizer(cls, bert_base: str | None):
        if bert_base is None:
            return cls.init_tokenizer()
        from transformers import BertTokenizer

        tokenizer = BertTokenizer.from_pretrained(bert_base, truncation_side="right")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    @classmethod
    def _init_qformer(cls, bert_base, num_query_token, vision_width, cross_attention_freq):
        if bert_base is None:
            return cls.init_Qformer(num_query_token, vision_width, cross_attention_freq)
        from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

        config = BertConfig.from_pretrained(bert_base)
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        has_weights = any(
            (Path(bert_base) / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
        )
        qformer = (
            BertLMHeadModel.from_pretrained(bert_base, config=config)
            if has_weights
            else BertLMHeadModel(config)
        )
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return qformer, query_tokens

    @classmethod
    def _init_vision(
        cls, vit_model, img_size, drop_path_rate, use_grad_checkpoint, precision, tiny_vit, vit_depth=None
    ):
        if vit_depth is not None and vit_model != "clip_L":
            raise ValueError(
                f"vit_depth applies to vit_model 'clip_L' only (EVA ViT-g's depth is fixed, tiny_eva's is "
                f"tiny_vit.depth), got vit_model {vit_model!r} with vit_depth {vit_depth}"
            )
        if vit_model == "clip_L":
            visual_encoder = clip_vit_l.build_clip_vit_l(
                img_size,
                clip_vit_l.SPRC_VIT_L_DEPTH if vit_depth is None else vit_depth,
                use_grad_checkpoint,
                precision,
                weights=clip_vit_l.CLIP_VIT_L_WEIGHTS,
            )
            return visual_encoder, LayerNorm(visual_encoder.num_features)
        if vit_model != "tiny_eva":
            return cls.init_vision_encoder(
                vit_model, img_size, drop_path_rate, use_grad_checkpoint, precision
            )
        from lavis.models.eva_vit import VisionTransformer

        if not tiny_vit:
            raise ValueError(
                "vit_model 'tiny_eva' needs a 'tiny_vit' config: {patch_size, width, depth, heads}"
            )
        visual_encoder = VisionTransformer(
            img_size=img_size,
            patch_size=tiny_vit["patch_size"],
            embed_dim=tiny_vit["width"],
            depth=tiny_vit["depth"],
            num_heads=tiny_vit["heads"],
            mlp_ratio=tiny_vit.get("mlp_ratio", 4.0),
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            use_mean_pooling=False,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_grad_checkpoint,
        )
        return visual_encoder, LayerNorm(visual_encoder.num_features)

    # ------------------------------------------------------------------ pieces shared by train and inference
    def _tokenize(self, texts):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"text_input must be a list of strings, got {type(texts).__name__}: {texts!r:.200}"
            )
        if len(texts) == 0:
            raise ValueError("text_input is empty: a batch needs at least one (reference, caption, target)")
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        if max(lengths) > self.max_txt_len and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"{sum(n > self.max_txt_len for n in lengths)} caption(s) have up to {max(lengths)} tokens and are "
                f"truncated to max_txt_len={self.max_txt_len} (raise max_txt_len in the model config to keep "
                "them); this warning is shown once",
                stacklevel=3,
            )
        return self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_txt_len,
            return_tensors="pt",
        ).to(self.device)

    @staticmethod
    def _check_images(images, what: str) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{what} must be a (B, 3, H, W) tensor, got {shape}")
        if images.size(0) == 0:
            raise ValueError(f"{what} is an empty batch")

    def _vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with self.maybe_autocast():
            tokens = self.ln_vision(self.visual_encoder(images))
        return tokens.float()

    def _composed_features(self, reference_tokens: torch.Tensor, text_tokens):
        """Caption + reference ViT tokens -> normalized composed feature (B, D) and fusion prompts (B, Q, H)."""
        if self.gated_fusion is not None:
            words = self.Qformer.bert.embeddings.word_embeddings(text_tokens.input_ids)
            reference_tokens = self.gated_fusion(reference_tokens, words, text_tokens.attention_mask)
        batch = reference_tokens.size(0)
        query_tokens = self.query_tokens.expand(batch, -1, -1)
        n_query = query_tokens.size(1)
        query_atts = torch.ones(batch, n_query, dtype=torch.long, device=reference_tokens.device)
        attention_mask = torch.cat([query_atts, text_tokens.attention_mask], dim=1)
        image_atts = torch.ones(reference_tokens.shape[:-1], dtype=torch.long, device=reference_tokens.device)
        fusion = self.Qformer.bert(
            text_tokens.input_ids,
            query_embeds=query_tokens,
            attention_mask=attention_mask,
            encoder_hidden_states=reference_tokens,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        prompts = fusion.last_hidden_state[:, :n_query, :]
        text_output = self.Qformer.bert(
            text_tokens.input_ids, query_embeds=prompts, attention_mask=attention_mask, return_dict=True
        )
        feats = F.normalize(self.text_proj(text_output.last_hidden_state[:, n_query, :]), dim=-1)
        return feats, prompts

    def _target_query_features(self, target_tokens: torch.Tensor) -> torch.Tensor:
        query_tokens = self.query_tokens.expand(target_tokens.size(0), -1, -1)
        target_atts = torch.ones(target_tokens.shape[:-1], dtype=torch.long, device=target_tokens.device)
        output = self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=target_tokens,
            encoder_attention_mask=target_atts,
            return_dict=True,
        )
        return F.normalize(self.vision_proj(output.last_hidden_state), dim=-1)

    @staticmethod
    def similarity(
        query_feats: torch.Tensor,
        target_feats: torch.Tensor,
        query_chunk: int | None = None,
        gallery_chunk: int | None = None,
    ) -> torch.Tensor:
        """Max over the target's query tokens of the cosine similarity: (B, D), (N, Q, D) -> (B, N).

        Args:
            query_feats: composed query features (B, D), normalized (:meth:`extract_composed_features`).
            target_feats: target query-token features (N, Q, D), normalized (:meth:`extract_target_features`).
            query_chunk: score this many queries at a time (None: all at once).
            gallery_chunk: score this many targets at a time (None: all at once).

        Returns:
            Similarities (B, N): for each query and target, the best of the target's Q tokens.

        Example:
            >>> import torch
            >>> q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
            >>> t = torch.nn.functional.normalize(torch.randn(5, 3, 8), dim=-1)
            >>> Blip2QformerCirAlignPrompt.similarity(q, t, gallery_chunk=2).shape
            torch.Size([2, 5])

        Scoring makes a (B, N, Q) temporary before the max; ``query_chunk`` / ``gallery_chunk`` score that many
        queries / targets at a time, so evaluation memory is query_chunk x gallery_chunk x Q instead of
        B x N x Q (13 GB for 1024 queries over a 100k gallery). The scores are the same bits chunked or not:
        every block is zero-padded to multiples of ``_SIM_PAD`` (rows, targets, width) before its matmul,
        because CPU BLAS rounds the edges of an odd-shaped matmul differently from its interior.
        """
        if query_feats.dim() != 2 or target_feats.dim() != 3 or query_feats.size(1) != target_feats.size(2):
            raise ValueError(
                f"similarity needs query features (B, D) and target features (N, Q, D) of the same D, got "
                f"{tuple(query_feats.shape)} and {tuple(target_feats.shape)}"
            )
        for name, chunk in (("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk)):
            if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
                raise ValueError(f"{name} must be a positive int or None (no chunking), got {chunk!r}")
        n_queries, n_targets = query_feats.size(0), target_feats.size(0)
        query_chunk = query_chunk or max(n_queries, 1)
        gallery_chunk = gallery_chunk or max(n_targets, 1)
        if query_chunk >= n_queries and gallery_chunk >= n_targets:
            return _padded_similarity(query_feats, target_feats)
        out = query_feats.new_empty(n_queries, n_targets)
        for i in range(0, n_queries, query_chunk):
            for j in range(0, n_targets, gallery_chunk):
                out[i : i + query_chunk, j : j + gallery_chunk] = _padded_similarity(
                    query_feats[i : i + query_chunk], target_feats[j : j + gallery_chunk]
                )
        return out

    # ------------------------------------------------------------------ training
    def forward(self, samples: dict) -> dict:
        for key in ("image", "target", "text_input"):
            if key not in samples:
                raise KeyError(
                    f"blip2_cir_align_prompt.forward needs samples['{key}']; got keys {sorted(samples)}"
                )
        image, target, text = samples["image"], samples["target"], samples["text_input"]
        self._check_images(image, "samples['image'] (reference images)")
        self._check_images(target, "samples['target'] (target images)")
        if not (image.size(0) == target.size(0) == len(text)):
            raise ValueError(
                f"mismatched batch: {image.size(0)} reference images, {target.size(0)} target images, "
                f"{len(text)} captions; each triplet needs one of each"
            )
        text_tokens = self._tokenize(text)
        fusion_feats, fusion_prompts = self._composed_features(self._vision_tokens(image), text_tokens)
        target_feats = self._target_query_features(self._vision_tokens(target))

        negatives, labels = self._negatives(target_feats)
        sim = self.similarity(fusion_feats, negatives) / self.temp
        loss_itc = F.cross_entropy(sim, labels)

        # Relative contrastive: learnable prompts in SPRC's image-free (no_img) layout, feature at [CLS].
        prompt_tokens = self.prompt_tokens.expand(image.size(0), -1, -1)
        query_atts = torch.ones(prompt_tokens.shape[:-1], dtype=torch.long, device=image.device)
        prompt_output = self.Qformer.bert(
            text_tokens.input_ids,
            query_embeds=prompt_tokens,
            attention_mask=torch.cat([query_atts, text_tokens.attention_mask], dim=1),
            return_dict=True,
            no_img=True,
        )
        text_only = F.normalize(self.text_proj(prompt_output.last_hidden_state[:, 0, :]), dim=-1)
        loss_rtc = F.cross_entropy(self.similarity(text_only, negatives) / self.temp, labels)

        loss_align = F.mse_loss(fusion_prompts.mean(1), prompt_tokens.detach().mean(1))
        loss = loss_itc + self.loss_rtc_weight * loss_rtc + self.loss_align_weight * loss_align
        return {"loss": loss, "loss_itc": loss_itc, "loss_rtc": loss_rtc, "loss_align": loss_align}

    def _negatives(self, target_feats: torch.Tensor):
        """In-batch targets (SPRC), or every rank's targets when ``gather_negatives`` is on under DDP.

        Gathered with LAVIS's ``all_gather_with_grad``, whose backward sums every rank's gradient for this
        rank's rows; DDP then averages over the ranks, so each term's gradient equals one process's on the
        concatenated batch (tests/test_lavis_gradient_scale.py). Without the gather each GPU's loss is a
        smaller task with per-GPU negatives: another loss, not only another scale.
        """
        batch = target_feats.size(0)
        labels = torch.arange(batch, device=target_feats.device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.gather_negatives and distributed and torch.distributed.get_world_size() > 1):
            return target_feats, labels
        gathered = all_gather_with_grad(target_feats)
        return gathered, labels + torch.distributed.get_rank() * batch

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def extract_reference_features(self, images: torch.Tensor) -> torch.Tensor:
        """Reference ViT tokens after ``ln_vision`` (B, T, Dv); the caption is fused later, in ``inference``."""
        self._check_images(images, "reference images")
        return self._vision_tokens(images)

    @torch.no_grad()
    def extract_target_features(self, images: torch.Tensor, fp16: bool = False) -> torch.Tensor:
        """Normalized target query features (N, Q, D), the gallery cache (fp16 halves its memory).

        Args:
            images: target images (N, 3, H, W), processed as the model's ``vis_processor`` does.
            fp16: return half precision (the cache of a large gallery).

        Returns:
            (N, Q, D) features, Q = the Q-Former's query tokens; pass them to :meth:`inference`.

        Example:
            >>> from lavis.models import load_model  # doctest: +SKIP
            >>> model = load_model("blip2_cir_align_prompt", "pretrain", is_eval=True)  # doctest: +SKIP
            >>> gallery = model.extract_target_features(images)  # doctest: +SKIP
        """
        self._check_images(images, "target images")
        feats = self._target_query_features(self._vision_tokens(images))
        return feats.half() if fp16 else feats

    @torch.no_grad()
    def extract_composed_features(self, reference: torch.Tensor, texts) -> torch.Tensor:
        """Normalized composed query features (B, D) from reference tokens and captions."""
        if reference.dim() != 3:
            raise ValueError(
                f"reference must be ViT tokens (B, T, Dv) from extract_reference_features, got {tuple(reference.shape)}"
            )
        if reference.size(0) != len(texts):
            raise ValueError(
                f"mismatched inputs: {reference.size(0)} reference images but {len(texts)} captions"
            )
        return self._composed_features(reference, self._tokenize(texts))[0]

    @torch.no_grad()
    def inference(self, reference: torch.Tensor, target_feats: torch.Tensor, texts) -> torch.Tensor:
        """Similarity (B, N) of each (reference, caption) query with each cached target (N, Q, D).

        Args:
            reference: reference-image ViT tokens (B, T, Dv) from :meth:`extract_reference_features`.
            target_feats: the gallery cache (N, Q, D) from :meth:`extract_target_features`.
            texts: B modification captions.

        Returns:
            Scores (B, N); ``scores.argsort(dim=1, descending=True)`` ranks the gallery for each query.

        Example:
            >>> reference = model.extract_reference_features(reference_images)  # doctest: +SKIP
            >>> scores = model.inference(reference, gallery, ["make it red", "remove the dog"])  # doctest: +SKIP
        """
        if target_feats.dim() != 3:
            raise ValueError(
                f"target_feats must be (N, Q, D) from extract_target_features, got {tuple(target_feats.shape)}"
            )
        return self.similarity(self.extract_composed_features(reference, texts), target_feats)

    @torch.no_grad()
    def fusion_gate_map(self, reference: torch.Tensor, texts) -> torch.Tensor | None:
        """Per-token fusion gate (B, T) for reference ViT tokens and captions (None without gated fusion):
        where in the reference image the caption is let in; the first token is the ViT's [CLS]."""
        if self.gated_fusion is None:
            return None
        text_tokens = self._tokenize(texts)
        words = self.Qformer.bert.embeddings.word_embeddings(text_tokens.input_ids)
        return self.gated_fusion.token_gate(reference, words, text_tokens.attention_mask)

    def fusion_parameter_count(self) -> int:
        """Parameters added by gated fusion (0 when it is off, i.e. exactly SPRC)."""
        return 0 if self.gated_fusion is None else self.gated_fusion.num_parameters()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``strict`` accepts a state dict that lacks only frozen parameters.

        LAVIS's runner saves only parameters that require grad (frozen ViT, frozen Q-Former under LoRA, the
        unused heads) but resumes with a strict ``load_state_dict``, which would reject its own checkpoints;
        the frozen weights come from the pretrained checkpoint the model was built from. Unexpected keys and
        missing trainable parameters still fail.
        """
        if strict:
            frozen = {name for name, param in self.named_parameters() if not param.requires_grad}
            missing = set(self.state_dict()) - set(state_dict)
            if missing and missing <= frozen:
                result = super().load_state_dict(state_dict, strict=False, assign=assign)
                if result.unexpected_keys:
                    raise RuntimeError(
                        f"unexpected key(s) in state_dict for {type(self).__name__}: {result.unexpected_keys}"
                    )
                return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ LAVIS config plumbing
    @classmethod
    def from_config(cls, cfg):
        values = _check_config(cfg)
        lora = values.get("lora")
        if lora is not None:
            check_lora_config(lora)  # fail before the model is built
        bert_base = values.get("bert_base")
        if bert_base == "tiny":
            from lavis_ext.tiny import tiny_bert_folder

            if not values.get("tiny_bert"):
                raise ValueError(
                    "bert_base 'tiny' needs a 'tiny_bert' config (hidden_size, num_hidden_layers, ...)"
                )
            bert_base = str(tiny_bert_folder(values["tiny_bert"]))
        model = cls(
            vit_model=values.get("vit_model", "eva_clip_g"),
            img_size=values.get("image_size", 224),
            drop_path_rate=values.get("drop_path_rate", 0),
            use_grad_checkpoint=values.get("use_grad_checkpoint", False),
            vit_precision=values.get("vit_precision", "fp16"),
            freeze_vit=values.get("freeze_vit", True),
            num_query_token=values.get("num_query_token", 32),
            cross_attention_freq=values.get("cross_attention_freq", 2),
            embed_dim=values.get("embed_dim", 256),
            max_txt_len=values.get("max_txt_len", 32),
            loss_rtc=values.get("loss_rtc", 0.4),
            loss_align=values.get("loss_align", 0.4),
            use_gated_fusion=values.get("use_gated_fusion", False),
            gather_negatives=values.get("gather_negatives", True),
            bert_base=bert_base,
            tiny_vit=values.get("tiny_vit"),
            vit_depth=values.get("vit_depth"),
        )
        model.load_checkpoint_from_config(cfg, lora=lora)
        return model

    def load_checkpoint_from_config(self, cfg, lora: dict | None = None, **kwargs):
        """LAVIS's rule (``finetuned`` when ``load_finetuned``, else ``pretrained``; an empty path means "start
        from the init"), in every checkpoint layout :func:`read_state_dict` reads, with LoRA in between.

        The pretrained (BLIP-2) weights load before LoRA wraps the Q-Former, so they keep their plain key
        names; a fine-tuned checkpoint loads after it, so LoRA weights find their modules. A fine-tuned file
        that leaves out frozen weights (a runner checkpoint) gets them from ``pretrained`` first.
        """
        finetuned = cfg.get("finetuned") if cfg.get("load_finetuned", True) else None
        pretrained = cfg.get("pretrained")
        state_dict = meta = None
        if finetuned:
            state_dict, meta = read_state_dict(finetuned)
        if pretrained and (state_dict is None or set(self.state_dict()) - set(state_dict)):
            self.load_from_pretrained(pretrained)
        if lora is not None:
            apply_qformer_lora(self.Qformer, lora)
        if state_dict is not None:
            self._load_finetuned(state_dict, meta)

    def load_checkpoint(self, url_or_filename):
        """Load a fine-tuned checkpoint (SPRC release, LAVIS runner checkpoint or bare state dict), strictly:
        every trainable parameter must be in it and nothing else may be (frozen ones may be left out)."""
        return self._load_finetuned(*read_state_dict(url_or_filename))

    def load_from_pretrained(self, url_or_filename):
        """Load BLIP-2 weights to start from (any layout), as LAVIS does: keys this model has beyond BLIP-2's
        (``prompt_tokens``, gated fusion) keep their init, keys it lacks are reported, not fatal (BLIP-2 files of
        other heads carry modules this model does not have). A ViT of another depth is refused."""
        state_dict, meta = read_state_dict(url_or_filename)
        self._check_vit_depth(state_dict, meta, exact=False)
        result = super().load_state_dict(state_dict, strict=False)
        logger.info(
            "loaded pretrained %s (%s layout): %d keys not in the file keep their init, %d keys of the file unused",
            meta["path"],
            meta["format"],
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
        if result.unexpected_keys:
            logger.warning(
                "pretrained %s: %d key(s) this model does not have, unused: %s",
                meta["path"],
                len(result.unexpected_keys),
                result.unexpected_keys[:10],
            )
        return result

    def _load_finetuned(self, state_dict: dict, meta: dict):
        self._check_vit_depth(state_dict, meta, exact=True)
        result = self.load_state_dict(state_dict, strict=True)
        logger.info("loaded checkpoint %s (%s layout)", meta["path"], meta["format"])
        return result

    def _check_vit_depth(self, state_dict: dict, meta: dict, exact: bool) -> None:
        """Refuse a checkpoint whose ViT has another number of blocks than the built one.

        A fine-tuned checkpoint must match exactly. A pretrained one may hold fewer blocks (the rest come from
        the ViT's own weights, as in SPRC, whose 23-block ViT-L starts from LAVIS's 21-block BLIP-2 file), never
        more: a non-strict load would silently drop them.
        """
        found = clip_vit_l.vit_depth_of(state_dict, "visual_encoder.")
        built = clip_vit_l.vit_depth_of(self.state_dict(), "visual_encoder.")
        if found is None or built is None or found == built or (found < built and not exact):
            return
        is_clip = any(k.startswith("visual_encoder.transformer.resblocks.") for k in state_dict)
        fix = (
            f"set the model config key vit_depth: {found} (--options model.vit_depth={found}); SPRC's ViT-L "
            f"checkpoints hold {clip_vit_l.SPRC_VIT_L_DEPTH}, LAVIS's BLIP-2 pretrain_vitL {clip_vit_l.LAVIS_VIT_L_DEPTH}"
            if is_clip
            else "it was trained with another vit_model (EVA ViT-g has 39 blocks)"
        )
        raise ValueError(
            f"checkpoint {meta['path']} holds a ViT with {found} blocks but this model was built with {built}: {fix}"
        )

    @classmethod
    def default_config_path(cls, model_type):
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise ValueError(
                f"unknown model_type {model_type!r} for blip2_cir_align_prompt; "
                f"accepted: {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)}"
            )
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]
