"""Turning a raw question into the text the policy sees before its response."""

from __future__ import annotations

from typing import Any

# For models trained here on '####'-style solutions (the synthetic task, GSM8K).
DEFAULT_INSTRUCTION = "Solve step by step and write the final answer after '####'."
# What Qwen2.5-Math models are trained with.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(
    tokenizer: Any,
    question: str,
    *,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> str:
    """The prompt text for ``question``, ending where the response starts.

    ``instruction`` (None or "" for none) goes on its own line after the question. With a
    chat template on the tokenizer, one user turn (after an optional system turn) is
    rendered with ``add_generation_prompt=True``; without one, a plain
    ``Question: ...\\nAnswer:\\n`` template is used, preceded by the system prompt if any.
    """
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    header = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{header}Question: {content}\nAnswer:\n"
