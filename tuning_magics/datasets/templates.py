"""Hand-written layouts of each family's chat template: the preview's fallback when no tokenizer is at hand.

The dataset report shows the first example through the model's own tokenizer
(:func:`tuning_magics.datasets.render.preview`) wherever it can. These layouts
serve only where it cannot (Gemini, or an open model whose tokenizer is not on
this machine), and the report calls them an approximation. They mark loss as
the engine does: the assistant's reply and its end-of-turn marker, not the
white space after it.
"""

from __future__ import annotations

from .formats import images_of, text_of

# family -> (turn opening by role, turn closing, text before the first turn)
_TEMPLATES = {
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
    return _FAMILY_TEMPLATE.get(spec.family, "chatml")


def segments(messages: list[dict], model_id: str | None = None) -> list[tuple[str, bool]]:
    """The conversation as (text, carries_loss) pieces in a hand-written layout of the family's template."""
    opens, close, start = _TEMPLATES[template_for(model_id)]
    out: list[tuple[str, bool]] = [(start, False)] if start else []
    pending_system = None
    gemma = opens["system"] == opens["user"]
    for m in messages:
        text = text_of(m["content"])
        images = images_of(m["content"])
        if images:
            text = "".join(f"<image {u[:40]}{'…' if len(u) > 40 else ''}>" for u in images) + text
        role = "assistant" if m["role"] == "model" else m["role"]
        if gemma and role == "system":
            pending_system = text  # Gemma folds the system prompt into the first user turn
            continue
        if gemma and role == "user" and pending_system:
            text, pending_system = f"{pending_system}\n\n{text}", None
        out.append((opens[role], False))
        if role == "assistant":
            body = text + close
            out += [(body.rstrip(), True), (body[len(body.rstrip()):], False)]
        else:
            out.append((text + close, False))
    return [s for s in out if s[0]]
