"""The byte-level tokenizer and ChatML chat template of the built-in tiny models.

Built in code, deterministically, from the ``tokenizers`` library: five special
tokens followed by the 256 byte tokens, no merges. Every string round-trips
exactly, so the tiny models can learn any text (names, numbers, other scripts)
without a trained vocabulary. The chat template is ChatML, the format Qwen uses:

    <bos><|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n

``<|im_end|>`` is the tokenizer's eos token so generation stops at the end of
the assistant's turn.
"""

from __future__ import annotations

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)
#: Size of the vocabulary: the special tokens then the 256 bytes.
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Content may be a plain string or a list of parts (multimodal chat format); only
# text parts are rendered because the tiny models are text-only.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'assistant' if message['role'] == 'model' else message['role'] %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\n') %}{% endif %}"
    "{{ '<|im_start|>' + role + '\n' + text + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """The printable character standing for each byte 0..255 (the GPT-2 byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer():
    """A fresh byte-level fast tokenizer with the ChatML chat template (a transformers tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, ch in enumerate(_bytes_to_unicode()):
        vocab[ch] = len(SPECIAL_TOKENS) + i
    # BPE without merges over the byte alphabet is a pure byte tokenizer.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[EOS, IM_START],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
