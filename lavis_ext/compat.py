"""Make the unmodified ``salesforce-lavis`` 1.0.2 run on transformers 5.x and timm 1.x.

LAVIS 1.0.2 (March 2023, unmaintained) was written against transformers 4.26 and timm 0.4.12. Rather than
vendor an edited copy (as SPRC does), :func:`apply` installs small shims, each bridging one API change of
the host libraries, *before* ``lavis`` is imported. It is idempotent and is called by ``import lavis_ext``.

Every shim is listed in :data:`SHIMS` with the change it bridges; ``tests/test_lavis_compat.py`` covers them.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["apply", "applied", "SHIMS"]

_APPLIED = False
SHIMS: dict[str, str] = {}


def _shim(description: str) -> Callable:
    def register(fn: Callable) -> Callable:
        SHIMS[fn.__name__] = description
        return fn

    return register


def find_pruneable_heads_and_indices(
    heads: list[int] | set[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """Heads still to prune and the flat indices of the dimensions to keep (removed in transformers 5)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        shift = sum(1 for pruned in already_pruned_heads if pruned < head)
        mask[head - shift] = 0
    keep = mask.view(-1).eq(1)
    return heads, torch.arange(len(keep))[keep].long()


@_shim(
    "transformers 5 moved apply_chunking_to_forward/prune_linear_layer to transformers.pytorch_utils "
    "and removed find_pruneable_heads_and_indices; LAVIS imports all three from modeling_utils"
)
def _modeling_utils_exports() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    for module in (modeling_utils, pytorch_utils):
        if not hasattr(module, "find_pruneable_heads_and_indices"):
            module.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def _assert_device_map(device_map: dict, num_blocks: int) -> None:
    blocks = [block for ids in device_map.values() for block in ids]
    missing = sorted(set(range(num_blocks)) - set(blocks))
    duplicated = sorted({block for block in blocks if blocks.count(block) > 1})
    extra = sorted(set(blocks) - set(range(num_blocks)))
    if missing or duplicated or extra:
        raise ValueError(
            f"device_map must assign each of the {num_blocks} blocks to exactly one device; "
            f"missing {missing}, duplicated {duplicated}, out of range {extra}"
        )


def _get_device_map(n_layers: int, devices: list) -> dict:
    per_device = -(-n_layers // len(devices))
    layers = list(range(n_layers))
    return {device: layers[i * per_device : (i + 1) * per_device] for i, device in enumerate(devices)}


@_shim(
    "transformers 5 removed transformers.utils.model_parallel_utils (naive model parallelism); "
    "LAVIS's T5 imports assert_device_map/get_device_map from it at import time"
)
def _model_parallel_utils() -> None:
    name = "transformers.utils.model_parallel_utils"
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name, "Stand-in created by lavis_ext.compat (removed in transformers 5).")
    module.assert_device_map = _assert_device_map
    module.get_device_map = _get_device_map
    sys.modules[name] = module
    import transformers.utils

    transformers.utils.model_parallel_utils = module


@_shim(
    "transformers 5 models must call post_init(), which records all_tied_weights_keys; LAVIS's BERT "
    "variants (Q-Former, med, nlvr encoder) call the older init_weights() directly and then fail in tie_weights"
)
def _init_weights_without_post_init() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    if getattr(original, "_lavis_ext_shim", False):
        return

    def init_weights(self):
        if "all_tied_weights_keys" not in self.__dict__:
            # post_init() computes the transformers-5 bookkeeping and then calls init_weights() again.
            return self.post_init()
        return original(self)

    init_weights._lavis_ext_shim = True
    PreTrainedModel.init_weights = init_weights


_TIED_LM_HEAD = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_LM_HEAD_CLASSES = {
    "lavis.models.blip2_models.Qformer": ("BertLMHeadModel", "BertForMaskedLM"),
    "lavis.models.med": ("BertLMHeadModel", "BertForMaskedLM"),
}


@_shim(
    "transformers 5 reads tied parameters from a {target: source} dict in _tied_weights_keys; LAVIS's BERT "
    "LM heads share decoder.bias with predictions.bias without declaring it, so save_pretrained refused them"
)
def _declare_tied_lm_head() -> None:
    import importlib

    for module_name, class_names in _LM_HEAD_CLASSES.items():
        module = importlib.import_module(module_name)
        for class_name in class_names:
            cls = getattr(module, class_name, None)
            if cls is not None and not isinstance(cls.__dict__.get("_tied_weights_keys"), dict):
                cls._tied_weights_keys = dict(_TIED_LM_HEAD)


def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """1 = attend, 0 = masked  ->  additive mask broadcastable to (batch, heads, query, key)."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    else:
        raise ValueError(
            f"encoder_attention_mask must have 2 or 3 dims (batch, keys) / (batch, queries, keys); "
            f"got shape {tuple(encoder_attention_mask.shape)}"
        )
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """Per-layer head masks (num_layers x batch x heads x queries x keys) or a list of Nones."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask.to(dtype=self.dtype)


@_shim(
    "transformers 5 removed ModuleUtilsMixin.invert_attention_mask and get_head_mask, which LAVIS's "
    "Q-Former and BERT encoders call on every forward"
)
def _attention_mask_helpers() -> None:
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "invert_attention_mask"):
        PreTrainedModel.invert_attention_mask = _invert_attention_mask
    if not hasattr(PreTrainedModel, "get_head_mask"):
        PreTrainedModel.get_head_mask = _get_head_mask


BERT_BASE_ENV = "LAVIS_EXT_BERT_BASE"


def bert_base() -> str:
    """Where LAVIS's BLIP-2 code finds ``bert-base-uncased``: a hub name, or a local folder from the env."""
    return os.environ.get(BERT_BASE_ENV, "bert-base-uncased")


@_shim(
    "LAVIS hard-codes the hub name 'bert-base-uncased' for the BLIP-2 tokenizer and Q-Former config; "
    f"${BERT_BASE_ENV} points it at a local folder instead (offline clusters, tests)"
)
def _local_bert_base() -> None:
    from lavis.models.blip2_models.blip2 import Blip2Base
    from transformers import BertTokenizer

    if getattr(Blip2Base.init_tokenizer, "_lavis_ext_shim", False):
        return
    original_init_qformer = Blip2Base.init_Qformer.__func__

    def init_tokenizer(cls, truncation_side: str = "right"):
        tokenizer = BertTokenizer.from_pretrained(bert_base(), truncation_side=truncation_side)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):  # noqa: N802 (LAVIS's name)
        import lavis.models.blip2_models.blip2 as blip2_module

        if bert_base() == "bert-base-uncased":
            return original_init_qformer(cls, num_query_token, vision_width, cross_attention_freq)
        # Same construction as LAVIS's, reading config and weights from the local folder.
        from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

        config = BertConfig.from_pretrained(bert_base())
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        qformer = BertLMHeadModel.from_pretrained(bert_base(), config=config)
        query_tokens = blip2_module.nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return qformer, query_tokens

    init_tokenizer._lavis_ext_shim = True
    Blip2Base.init_tokenizer = classmethod(init_tokenizer)
    Blip2Base.init_Qformer = classmethod(init_Qformer)


def _cpu_distributed_init(original: Callable) -> Callable:
    def init_distributed_mode(args):
        if torch.cuda.is_available() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return original(args)
        import lavis.common.dist_utils as dist_utils

        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
        args.distributed = True
        args.dist_backend = "gloo"
        torch.distributed.init_process_group(
            backend="gloo", init_method=args.dist_url, world_size=args.world_size, rank=args.rank
        )
        torch.distributed.barrier()
        dist_utils.setup_for_distributed(args.rank == 0)

    init_distributed_mode._lavis_ext_shim = True
    return init_distributed_mode


class _DeviceAwareDDP(nn.parallel.DistributedDataParallel):
    """LAVIS passes ``device_ids=[gpu]`` unconditionally; a CPU module must get ``device_ids=None``."""

    def __init__(self, module: nn.Module, device_ids=None, **kwargs):
        on_cpu = next(module.parameters()).device.type == "cpu"
        super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)


def _synchronize_between_processes(self) -> None:
    import lavis.common.dist_utils as dist_utils

    if not dist_utils.is_dist_avail_and_initialized():
        return
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    totals = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
    torch.distributed.barrier()
    torch.distributed.all_reduce(totals)
    count, total = totals.tolist()
    self.count, self.total = int(count), total


class _CpuLoader:
    """Pass-through stand-in for LAVIS's PrefetchLoader, which creates a CUDA stream even on CPU runs."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _prefetch_loader(original: type) -> Callable:
    def make(loader):
        return original(loader) if torch.cuda.is_available() else _CpuLoader(loader)

    make._lavis_ext_shim = True
    return make


def _runner_model(self):
    """LAVIS wraps the model only when it moves device, so a model already on the run device (CPU) was None."""
    if self._model.device != self.device:
        self._model = self._model.to(self.device)
    if self._wrapped_model is None:
        if self.use_distributed:
            self._wrapped_model = _DeviceAwareDDP(self._model, device_ids=[self.config.run_cfg.gpu])
        else:
            self._wrapped_model = self._model
    return self._wrapped_model


@_shim(
    "LAVIS's distributed path assumes CUDA (nccl backend, torch.cuda.set_device, DDP device_ids, metric "
    "sync on 'cuda'); on a machine without CUDA, torchrun now uses gloo on CPU. GPU behaviour is unchanged. "
    "RunnerBase.model also left the model unwrapped (None) when it already sat on the run device (CPU), and "
    "its PrefetchLoader opened a CUDA stream on CPU runs"
)
def _cpu_distributed() -> None:
    import lavis.common.dist_utils as dist_utils
    import lavis.common.logger as lavis_logger
    import lavis.runners.runner_base as runner_base

    if not getattr(dist_utils.init_distributed_mode, "_lavis_ext_shim", False):
        dist_utils.init_distributed_mode = _cpu_distributed_init(dist_utils.init_distributed_mode)
    runner_base.DDP = _DeviceAwareDDP
    runner_base.RunnerBase.model = property(_runner_model)
    if not getattr(runner_base.PrefetchLoader, "_lavis_ext_shim", False):
        runner_base.PrefetchLoader = _prefetch_loader(runner_base.PrefetchLoader)
    lavis_logger.SmoothedValue.synchronize_between_processes = _synchronize_between_processes


@_shim(
    "LAVIS sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True when imported (coco_caption_datasets.py), for the "
    "whole process: half-written images then decode with grey padding and train without a word, in lavis_ext "
    "and in diffusers_ext/clip_ext in the same process. Restored to PIL's default (False), so a truncated file "
    "raises and our datasets name it"
)
def _strict_image_loading() -> None:
    import lavis.datasets.datasets.coco_caption_datasets  # noqa: F401  (the import that sets it)
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


@_shim(
    "LAVIS's Config.build_model_config looks up `model.model_type` as a flat key of the parsed --options, "
    "which are nested ({'model': {'model_type': ...}}), so `--options model.model_type=X` never chose X's "
    "default model YAML: the project file's model type was built instead, without a word. The nested key "
    "is honoured"
)
def _options_model_type() -> None:
    from lavis.common.config import Config

    original = Config.__dict__["build_model_config"].__func__
    if getattr(original, "_lavis_ext_shim", False):
        return

    def build_model_config(config, **kwargs):
        options = kwargs.get("model")
        model_type = options.get("model_type") if options is not None else None
        if model_type and not kwargs.get("model.model_type"):
            kwargs["model.model_type"] = model_type
        return original(config, **kwargs)

    build_model_config._lavis_ext_shim = True
    Config.build_model_config = staticmethod(build_model_config)


def apply() -> None:
    """Install every shim once; safe to call any number of times, before or after ``import lavis``."""
    global _APPLIED
    if _APPLIED:
        return
    for name in list(SHIMS):
        globals()[name]()
    _APPLIED = True


def applied() -> bool:
    return _APPLIED
