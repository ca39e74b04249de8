"""How each model family lays a conversation out in training, with the loss-bearing spans marked.

Used to show a user one example exactly as the model will see it: the text of
the chat template, with the assistant replies (and their end-of-turn marker),
the only tokens the loss is taken on, marked.
"""

from __future__ import annotations

from . import tokenizer as T
from .formats import images_of, text_of

# family -> (turn opening by role, turn closing, text before the first turn)
_TEMPLATES = {
    # The built-in tiny models' own template, from their tokenizer module.
    "builtin": (T.TEMPLATE_OPEN, T.TEMPLATE_CLOSE, T.TEMPLATE_START),
    "chatml": ({"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
                "assistant": "<|im_start|>assistant\n"}, "<|im_end|>\n", ""),
    "llama": ({"system": "<|start_header_id|>system<|end_header_id|>\n\n",
               "user": "<|start_header_id|>user<|end_header_id|>\n\n",
               "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n"}, "<|eot_id|>", "<|begin_of_text|>"),
    "gemma": ({"system": "<start_of_turn>user\n", "user": "<start_of_turn>user\n",
               "assistant": "<start_of_turn>model\n"}, "<end_of_turn>\n", "<bos>"),
    "gemini": ({"system": "[system instruction]\n", "user": "[user]\n", "assistant": "[model]\n"}, "\n", ""),
}

_FAMILY_TEMPLATE = {"qwen3": "chatml", "llama": "llama", "llama4": "llama", "gemma3": "gemma", "gemini": "gemini"}


def template_for(model_id: str | None) -> str:
    """The template name for a model id (ChatML when unknown)."""
    from ..catalog import find

    spec = find(model_id)
    if spec is None:
        return "chatml"
    if spec.provider == "local":
        return "builtin"
    return _FAMILY_TEMPLATE.get(spec.family, "chatml")


def segments(messages: list[dict], model_id: str | None = None) -> list[tuple[str, bool]]:
    """The conversation as (text, carries_loss) pieces in the model's chat template."""
    opens, close, start = _TEMPLATES[template_for(model_id)]
    out: list[tuple[str, bool]] = [(start, False)] if start else []
    pending_system = None
    gemma = opens["system"] == opens["user"]
    for m in messages:
        text = text_of(m["content"])
        images = images_of(m["content"])
        if images:
            text = "".join(f"<image {u[:40]}{'…' if len(u) > 40 else ''}>" for u in images) + text
        role = m["role"]
        if gemma and role == "system":
            pending_system = text  # Gemma folds the system prompt into the first user turn
            continue
        if gemma and role == "user" and pending_system:
            text, pending_system = f"{pending_system}\n\n{text}", None
        out.append((opens[role], False))
        if role == "assistant":
            out.append((text + close, True))
        else:
            out.append((text + close, False))
    return [s for s in out if s[0]]
