"""Silences one message a user of mace cannot act on: transformers announces, once per class,
that an image processor falls back to its PIL version when torchvision is absent. mace never
uses those processors for its work (diffusers imports them with the pipelines), so the notice
only clutters every command's output. Other transformers messages are untouched."""

from __future__ import annotations

import logging


class _TorchvisionFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
