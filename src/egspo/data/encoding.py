"""From text to token ids: prompts for sampling, demonstrations for SFT.

One place decides the prompt format, where a prompt is cut when it is too long (from the
left, keeping the question's end and the template's generation prompt) and whether the
tokenizer expects a BOS token in front, so that RL prompts, demonstrations and eval prompts
are encoded alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from egspo.config import PromptConfig
from egspo.data.prompts import format_prompt


@dataclass
class EncodedPrompts:
    """Left-padded prompt ids `[B, P]` and mask, with the number of prompts cut to fit."""

    input_ids: Tensor
    attention_mask: Tensor
    over_length: int


@dataclass
class EncodedDemonstrations:
    """`[prompt | response EOS]` rows, left-padded, and a mask of the response tokens.

    `over_length` counts rows cut to fit (prompt from the left, then response from the right).
    """

    input_ids: Tensor
    attention_mask: Tensor
    score_mask: Tensor  # [B, L] float: 1 on response tokens (EOS included)
    over_length: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> EncodedDemonstrations:
        """The rows `rows`, cut to their longest row (left padding: the tail columns hold the tokens)."""
        mask = self.attention_mask[rows]
        width = max(int(mask.sum(1).max()), 1)
        return EncodedDemonstrations(
            self.input_ids[rows, -width:], mask[:, -width:], self.score_mask[rows, -width:], 0
        )


class PromptEncoder:
    """Formats and tokenises prompts and demonstrations for one tokenizer and prompt config."""

    def __init__(self, tokenizer, config: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.bos_token_id = _expected_bos(tokenizer)

    def format(self, question: str) -> str:
        return format_prompt(
            self.tokenizer,
            question,
            system_prompt=self.config.system_prompt,
            instruction=self.config.instruction,
        )

    def _prompt_ids(self, questions: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each formatted prompt, cut from the left to fit, and which were cut.

        A leading BOS (added here when the tokenizer expects one, or written by the chat
        template) survives the cut: the model has only ever seen text that starts with it, so
        an over-long prompt keeps `BOS + its last max_prompt_length - 1 tokens`.
        """
        rows = self.tokenizer([self.format(q) for q in questions], add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        limit = self.config.max_prompt_length
        kept, cut = [], []
        for row in rows:
            if bos is not None and row[:1] == [bos]:
                lead, body = row[:1], row[1:]
            else:
                lead, body = ([self.bos_token_id] if self.bos_token_id is not None else []), row
            room = limit - len(lead)  # >= 0: max_prompt_length >= 1
            cut.append(len(body) > room)
            kept.append([*lead, *body[max(len(body) - room, 0) :]])
        return kept, cut

    def prompts(self, questions: list[str], device: torch.device | str = "cpu") -> EncodedPrompts:
        """Prompts ready for the rollout engine; longer ones keep their end and are counted."""
        rows, cut = self._prompt_ids(questions)
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id, device)
        return EncodedPrompts(ids, mask, sum(cut))

    def demonstrations(
        self, questions: list[str], responses: list[str], device: torch.device | str = "cpu"
    ) -> EncodedDemonstrations:
        """`[prompt | response EOS]` with a mask on the response; cut to `max_sft_length` tokens."""
        prompts, cut = self._prompt_ids(questions)
        answers = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        limit = self.config.max_sft_length
        sequences, masks, over = [], [], 0
        for p, r, prompt_cut in zip(prompts, answers, cut, strict=True):
            full = [*p, *r, eos]
            over += prompt_cut or len(full) > limit
            seq = full[:limit]
            sequences.append(seq)
            masks.append([0] * min(len(p), len(seq)) + [1] * max(len(seq) - len(p), 0))
        ids, attention = left_pad(sequences, self.tokenizer.pad_token_id, device)
        score, _ = left_pad(masks, 0, device)
        return EncodedDemonstrations(ids, attention, score.float(), over)


def left_pad(rows: list[list[int]], pad: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """`[B, max_len]` ids padded on the left with `pad`, and the mask of real tokens."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _expected_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of every text (Llama, Gemma), else None.

    Asked of the tokenizer itself: the special tokens it adds around an empty text. Chat
    templates that write the BOS themselves are covered too: a prompt already starting with
    it gets no second one.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    return bos if added[:1] == [bos] else None
