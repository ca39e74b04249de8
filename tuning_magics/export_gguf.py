"""GGUF for llama.cpp and Ollama, written with the ``gguf`` package (the llama.cpp project's own writer).

:func:`write_gguf` turns an exported Hugging Face folder (see :mod:`tuning_magics.export`)
into one GGUF file for the architectures the engine tunes: Qwen3, Llama and Gemma 3
(text). It writes what llama.cpp reads: the hyperparameters under the architecture's
keys, the tensors under llama.cpp's names (Llama's query and key rows reordered for
llama.cpp's rotary layout, Gemma's norm weights stored with the 1 its RMSNorm adds),
the byte-level BPE vocabulary with its special tokens, the chat template training
rendered with, and the end-of-turn token. Weights are stored at ``f32``, ``f16``,
``bf16`` or ``q8_0`` (norms and other vectors stay f32, as llama.cpp's converter keeps them).

:func:`modelfile` writes Ollama's ``Modelfile`` for it: ``TEMPLATE`` in Go's template
language, made from the pieces the chat template puts around each turn (found by
rendering probe conversations), ``SYSTEM`` when training had one system prompt, and
``PARAMETER stop`` for each end-of-turn marker.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

#: The GGUF weight types offered, by the name export() takes.
QUANTIZATIONS = ("f16", "bf16", "q8_0", "f32")
#: transformers' architecture -> llama.cpp's.
ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}
#: llama.cpp's pre-tokenizer names for each architecture's own BPE tokenizer (its converter's table).
_PRE = {"qwen3": "qwen2", "llama": "llama-bpe", "gemma3": "default"}


def check_quantization(quantization: str) -> None:
    """A one-line UserError for a GGUF weight type this module does not write."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}",
                        field="quantization")


def check(config: dict, quantization: str) -> str:
    """llama.cpp's name for the model's architecture; a one-line UserError for one (or a type) it cannot write."""
    check_quantization(quantization)
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        raise UserError(f"GGUF export writes {', '.join(ARCHITECTURES)}, not {name}; export format='hf' and convert "
                        "that folder with llama.cpp's convert_hf_to_gguf.py", field="format")
    return ARCHITECTURES[name]


def _rope_theta(config: dict, default: float) -> float:
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params) if isinstance(params, dict) else {}
    return float(config.get("rope_theta") or params.get("rope_theta") or default)


def _permute(weights, heads: int):
    """Llama's query or key rows from transformers' rotary layout (halves) to llama.cpp's (pairs)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(folder: Path, size: int | None):
    """(tokens, token types, merges, pre-tokenizer or None) of a byte-level BPE ``tokenizer.json``."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (folder / "tokenizer.model").is_file():
        raise UserError("GGUF export writes byte-level BPE tokenizers (tokenizer.json) and this model has a "
                        "SentencePiece one; export format='hf' and convert it with llama.cpp's convert_hf_to_gguf.py",
                        field="format")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", True)
    real = max(by_id) + 1
    size = max(size or real, real)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, real


def write_gguf(folder, out_file, quantization: str = "f16") -> None:
    """The Hugging Face model in ``folder`` (an ``"hf"`` export) as the GGUF file ``out_file``."""
    import gguf
    import numpy as np

    folder, out_file = Path(folder), Path(out_file)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = check(config, quantization)
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    tokens, types, merges, real = _vocabulary(folder, None if arch == "gemma3" else config["vocab_size"])
    if arch == "gemma3":  # llama.cpp's Gemma reads as many embedding rows as the vocabulary has tokens
        tokens, types = tokens[:real], types[:real]

    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(config.get("_name_or_path") and Path(config["_name_or_path"]).name or arch)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config, 1_000_000.0 if arch != "llama" else 10_000.0))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(len(tokens))
    if arch == "gemma3":
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        if config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quantization]
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # The vocabulary: byte-level BPE ("gpt2" in llama.cpp), its special tokens, the template training used.
    writer.add_tokenizer_model("gpt2")
    byte_level = not merges and real <= 300  # the built-in tokenizer: one token per byte, nothing to pre-split
    writer.add_tokenizer_pre("default" if byte_level else _PRE[arch])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    special.add_to_gguf(writer)
    if not merges:
        # llama.cpp needs merges, and the writer leaves an empty list out: a byte vocabulary gets one that never
        # applies (two special tokens, which BPE never builds from the bytes of a text).
        controls = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL and " " not in t]
        merges = [" ".join(controls[:2])]
    writer.add_token_merges(merges)
    template = special.chat_template
    # The template writes the begin-of-text token itself: a runtime that added one too would start with two.
    writer.add_add_bos_token(not (template and "bos_token" in template))
    ends = end_of_turn(folder)
    if ends:  # the reply's end: the tokenizer's end of sequence where the engine ends there too
        eos = special.special_token_ids.get("eos")
        writer.add_eot_token_id(eos if eos in ends else ends[0])

    # The tensors, under llama.cpp's names.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for name, data in _tensors(folder):
        if name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the stored weight
        if arch == "gemma3" and name.endswith("embed_tokens.weight"):
            data = data[:len(tokens)]
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"GGUF export does not know where {name} goes in llama.cpp's {arch}; export format='hf'",
                            field="format")
        if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(new, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new, data.astype(np.float16))
        else:
            try:
                writer.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            except gguf.QuantError:  # a row length the block size does not divide: kept at f16
                writer.add_tensor(new, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(folder: Path):
    """Each weight of the folder's safetensors shards as a float32 array, one at a time (through torch, which reads
    bfloat16: the dtype open models are tuned and kept in, and one NumPy has not)."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, weights.get_tensor(name).float().numpy()


def end_of_turn(folder: Path) -> list[int]:
    """The token ids that end a reply, from the folder's generation config (the engine's own, in an export)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


# -- Ollama ------------------------------------------------------------------------------------------------------

_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01"}


def _pieces(tokenizer) -> dict:
    """What the chat template writes around each turn: ``start``, ``open``/``close`` per role, found by rendering
    conversations of marker texts; a one-line UserError for a template that is not turn by turn."""
    def render(messages, generation=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    s, u, a = (_MARK[r] for r in ("system", "user", "assistant"))
    full = render([{"role": "system", "content": s}, {"role": "user", "content": u},
                   {"role": "assistant", "content": a}, {"role": "user", "content": u}], generation=True)
    try:
        start, rest = full.split(s, 1)
        between_su, rest = rest.split(u, 1)
        between_ua, rest = rest.split(a, 1)
        between_au, rest = rest.split(u, 1)
        generation = rest
    except ValueError:
        raise UserError("the model's chat template does not write each turn's text as it is, so no Ollama TEMPLATE "
                        "can reproduce it; use format='gguf' with llama.cpp", field="format") from None
    if generation != between_ua:
        raise UserError("the model's chat template opens the reply differently from an answered turn, so no Ollama "
                        "TEMPLATE can reproduce it; use format='gguf' with llama.cpp", field="format")
    no_system = render([{"role": "user", "content": u}], generation=True)
    user_open = no_system.split(u, 1)[0]
    # The user turn's opening is what precedes its text with no system turn, less the template's own start.
    prefix = _common_prefix(start, user_open)
    return {"start": prefix, "system_open": start[len(prefix):], "between_su": between_su,
            "user_open": user_open[len(prefix):], "between_ua": between_ua, "between_au": between_au,
            "generation": generation}


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def modelfile(tokenizer, gguf_name: str, *, system: str | None = None, stops: list[str] = ()) -> str:
    """Ollama's Modelfile for ``gguf_name``: its TEMPLATE writes the turns as the model's chat template does
    (:func:`render_like_ollama` is the same template, in Python, to check that against the chat template)."""
    p = _pieces(tokenizer)
    template = (
        _go(p["start"])
        + "{{ if .System }}" + _go(p["system_open"]) + "{{ .System }}" + _go(p["between_su"])
        + "{{ else }}" + _go(p["user_open"]) + "{{ end }}"
        + "{{ range .Messages }}"
        + '{{ if eq .Role "user" }}{{ .Content }}' + _go(p["between_ua"])
        + '{{ else if eq .Role "assistant" }}{{ .Content }}' + _go(p["between_au"])
        + "{{ end }}{{ end }}"
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _go(text: str) -> str:
    """Literal text inside a Go template."""
    return text.replace("{{", '{{ "{{" }}')


def render_like_ollama(tokenizer, messages: list[dict]) -> str:
    """What the Modelfile's TEMPLATE writes for ``messages`` (a system turn first or none, then user and assistant
    turns, a user turn last), to compare with the chat template's own rendering of them with a generation prompt."""
    pieces = _pieces(tokenizer)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    messages = messages[1:] if system is not None else messages
    out = pieces["start"]
    out += (pieces["system_open"] + system + pieces["between_su"]) if system else pieces["user_open"]
    for m in messages:
        out += m["content"] + (pieces["between_ua"] if m["role"] == "user" else pieces["between_au"])
    return out
