"""Which of llama.cpp's built-in chat templates fits a model that ships without one."""

from __future__ import annotations

from edgepack.runtime import llama

from .errors import PackagerError

# GGUF architecture -> llama.cpp built-in template name (llama_chat_builtin_templates()).
BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "phi3": "phi3",
    "granite": "granite",
    "exaone": "exaone3",
}


def choose(architecture: str, embedded: str | None, requested: str | None) -> tuple[str | None, str]:
    """(template to record in the manifest or None to use the GGUF's own, a note for the user)."""
    builtin = llama.builtin_chat_templates()
    if requested is not None:
        if requested not in builtin:
            raise PackagerError(
                f"unknown chat template {requested!r}: llama.cpp knows {', '.join(builtin)}"
            )
        return requested, f"chat template: {requested} (from --chat-template)"
    if embedded:
        return None, "chat template: the model's own (tokenizer.chat_template)"
    guess = BY_ARCHITECTURE.get(architecture)
    if guess is None:
        return None, (
            f"chat template: none in the model and none known for {architecture!r}; "
            "/v1/chat/completions will refuse requests (pass --chat-template NAME)"
        )
    return guess, f"chat template: {guess} (llama.cpp built-in for {architecture}; the model has none)"
