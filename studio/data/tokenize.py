"""Tokenize rendered examples into ``input_ids`` and ``labels`` with the loss on the response.

Contract: ``tokenize_pair(prompt, response, tokenizer, max_length, train_on_inputs)`` returns a
``Tokenized`` with ``input_ids``, ``labels`` (-100 where no loss), the untruncated length and whether
it was truncated.  EOS is appended so the model learns to stop (unless the response text already
ends with it, as chat templates do).  The loss mask depends on positions, not on token ids, so a
pad token equal to EOS could never mask the EOS that ends a response.  ``ensure_pad_token`` gives a
tokenizer a pad token distinct from EOS where it can.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    full_length: int

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def ensure_pad_token(tokenizer) -> bool:
    """Set a pad token that is not EOS.  Returns True when a new token was added (embeddings must grow)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        return True
    return False  # pad == eos and no unk: positions-based masking keeps it harmless


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    bos = tokenizer.bos_token
    # Chat templates write BOS as text; adding it again would double it.
    add = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add)["input_ids"]


def tokenize_pair(prompt: str, response: str, tokenizer, max_length: int,
                  train_on_inputs: bool = False) -> Tokenized:
    p_ids = _encode(tokenizer, prompt, True)
    r_ids = _encode(tokenizer, response, False)
    eos = tokenizer.eos_token_id
    if eos is not None and not (r_ids and r_ids[-1] == eos):
        r_ids = r_ids + [eos]
    ids = p_ids + r_ids
    labels = (list(ids) if train_on_inputs else [IGNORE] * len(p_ids) + list(r_ids))
    return Tokenized(ids[:max_length], labels[:max_length], len(ids))
