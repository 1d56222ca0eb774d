"""Drop bitsandbytes' import-time notice about its optional 4-bit CPU kernel, and nothing else.

bitsandbytes >= 0.50 on a CPU with AVX512-BF16 warns, when it is imported, that its 4-bit GEMM kernel (from
the optional ``kernels`` package) is missing. diffusers imports bitsandbytes with its quantizers (the first
``UNet2DConditionModel`` import), so every demo, trainer and benchmark log carried the line, and nothing in
this package uses 4-bit weights. Installed when ``diffusers_ext`` is imported, before diffusers is: a filter
on that one logger that drops only that message; any other bitsandbytes warning still shows.
"""

from __future__ import annotations

import logging

LOGGER = "bitsandbytes.backends.cpu.ops"
NOTICE = "Failed to load CPU gemm_4bit_forward"


def _not_the_4bit_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NOTICE)


def quiet_4bit_notice() -> None:
    """Install the filter (once; a second call changes nothing)."""
    logger = logging.getLogger(LOGGER)
    if _not_the_4bit_notice not in logger.filters:
        logger.addFilter(_not_the_4bit_notice)
