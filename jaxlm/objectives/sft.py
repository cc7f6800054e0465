"""Supervised fine-tuning (`train.objective: sft`): next-token cross-entropy on chat records,
scored on the assistant's tokens only.

The loss is the next-token loss; what makes it SFT is the data: records rendered by a chat
template with a loss mask over the assistant turns (`jaxlm/data/chat.py`), packed whole into rows
(`jaxlm/data/records.py`), which refuse a record set or a batch with nothing to learn from.
"""

from __future__ import annotations

from jaxlm.objectives.next_token import NextToken


class SFT(NextToken):
    """Cross-entropy on the tokens the batch's loss mask marks (the assistant's), like next_token."""
