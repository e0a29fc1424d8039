"""Tokenize rendered examples into ``input_ids`` and ``labels`` with the loss on the response.

Contract: ``tokenize_pair(prompt, response, tokenizer, max_length, train_on_inputs)`` returns a
``Tokenized`` with ``input_ids``, ``labels`` (-100 where no loss), the untruncated length and whether
it was truncated; ``tokenize_pairs`` does the same for a list of pairs in a few tokenizer calls (the
pipeline's way: one call per pair cost seconds per 10,000 examples).  The ids are those of
``prompt + response`` as one text (so they decode to exactly the template's text); the loss starts at the
first token holding response characters.  ``encode_prompt`` gives the ids generation sends for a prompt,
which begin the training sequences of its template.  EOS is appended so the model learns to stop (unless
the response text already ends with it, as chat templates do).  The loss mask depends on positions, not
on token ids, so a pad token equal to EOS could never mask the EOS that ends a response.
``ensure_pad_token`` gives a tokenizer a pad token distinct from EOS where it can.
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
        return len(self.labels) - self.labels.count(IGNORE)


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


def _wholes(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int] | None]:
    """For each (prompt, response): the ids of ``prompt + response`` tokenized as one text, and how many of them
    belong to the prompt.

    One text, as the seed recipes tokenize it: encoding the response on its own would let a sentencepiece
    tokenizer (Llama, Mistral) put a word-start space before it ("### Response:\n Return", "Answer:  Return")
    that is in neither the template nor the data.  A token that holds both prompt and response characters
    (the space of "### Answer: " joined to the answer's first word) belongs to the response, as do the
    prompt's trailing spaces.  None where the tokenizer cannot map tokens to characters (a slow tokenizer).
    The texts go in as few tokenizer calls as the BOS rule allows (texts that open with BOS and texts that do
    not are encoded apart); a fast tokenizer encodes a list on its own threads, and per text gives the same
    ids as alone (no padding, no truncation)."""
    texts = [p + r for p, r in pairs]
    bos = tokenizer.bos_token
    out: list[tuple[list[int], int] | None] = [None] * len(texts)
    for add in (True, False):
        idx = [i for i, t in enumerate(texts) if (not (bos and t.startswith(bos))) == add]
        if not idx:
            continue
        try:
            enc = tokenizer([texts[i] for i in idx], add_special_tokens=add, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            return out
        offsets_all = enc.get("offset_mapping")
        if offsets_all is None:
            return out
        for i, ids, offsets in zip(idx, enc["input_ids"], offsets_all):
            if len(offsets) != len(ids):
                continue
            # The prompt's trailing spaces go with the answer whether or not the tokenizer joins them to its
            # first word, so the prompt's ids never depend on the answer (``encode_prompt`` sends exactly them).
            boundary = len(pairs[i][0].rstrip(" "))
            n_prompt = 0
            for start, end in offsets:
                if end > boundary:
                    break
                n_prompt += 1
            out[i] = (ids, n_prompt)
    return out


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids a generation prompt is sent as: the tokens that begin the training sequences of that template.

    A prompt that ends in spaces ("### Answer: ") is sent without them: in training that space is part of the
    answer's first token, so the model continues with it.
    """
    stripped = prompt.rstrip(" ")
    return _encode(tokenizer, stripped if stripped else prompt, True)


def tokenize_pair(prompt: str, response: str, tokenizer, max_length: int,
                  train_on_inputs: bool = False) -> Tokenized:
    return tokenize_pairs([(prompt, response)], tokenizer, max_length, train_on_inputs)[0]


BATCH = 2048  # texts per tokenizer call: its threads stay busy and a long file's offsets never all sit in memory


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int,
                   train_on_inputs: bool = False) -> list[Tokenized]:
    """``tokenize_pair`` for each pair, the same ids and labels, with the tokenizer called once per ``BATCH``
    pairs rather than once per pair (a 20,000-example file: about a second instead of ten)."""
    out = []
    eos = tokenizer.eos_token_id
    for k in range(0, len(pairs), BATCH):
        chunk = pairs[k:k + BATCH]
        for (prompt, response), whole in zip(chunk, _wholes(tokenizer, chunk)):
            if whole is not None:
                ids, n_prompt = whole
            else:
                p_ids = _encode(tokenizer, prompt, True)
                ids, n_prompt = p_ids + _encode(tokenizer, response, False), len(p_ids)
            if eos is not None and not (len(ids) > n_prompt and ids[-1] == eos):
                ids = ids + [eos]
            labels = (list(ids) if train_on_inputs else [IGNORE] * n_prompt + list(ids[n_prompt:]))
            out.append(Tokenized(ids[:max_length], labels[:max_length], len(ids)))
    return out
