"""Prompt text: the one place where text is checked and wrapped in a tokenizer's chat template."""

from __future__ import annotations

from ..errors import PromptError


def check_text(text: str, what: str = "prompt") -> None:
    """Text must be a string that encodes as UTF-8 (a lone surrogate such as "\\ud800" does not)."""
    if not isinstance(text, str):
        raise PromptError(f"the {what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"the {what} is not valid Unicode text ({exc.reason} at position {exc.start})") from None


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` (OpenAI-style dicts) through the tokenizer's chat template, the assistant turn opened.
    Raises ``PromptError`` when there is no template or a message's text is not valid Unicode."""
    if not has_chat_template(tokenizer):
        raise PromptError("this model's tokenizer has no chat template, so a chat prompt cannot be built")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            check_text(content, f"content of message {i}")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def user_turn(tokenizer, text: str) -> str:
    """``text`` as one user turn in the chat template, ready for the assistant's reply."""
    return chat_text(tokenizer, [{"role": "user", "content": text}])
