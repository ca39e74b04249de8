"""job.export(): the tuned model written for other runtimes, loaded by them on their own and proven to answer as
job.chat does, on real local jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finish

pytest.importorskip("torch")

import tuning_magics as tm  # noqa: E402
from tuning_magics.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow
FACTS = [{"prompt": f"What is the capital of Zorvia {i}?", "completion": f"Port {i}."} for i in range(16)]


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """A registry of the module's own: no job another test left behind holds the one slot its jobs queue for."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNING_MAGICS_HOME", str(tmp_path_factory.mktemp("export-home")))
        yield


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A LoRA job and a full tuning job of local/tiny-qwen3 on the same invented facts."""
    root = tmp_path_factory.mktemp("export-jobs")
    lora = tm.tune("local/tiny-qwen3", FACTS, validation_dataset=FACTS[:4], tuning_mode="PEFT_ADAPTER", epochs=20,
                   output_uri=str(root / "lora"))
    lora.wait(timeout=600)
    full = tm.tune("local/tiny-qwen3", FACTS, epochs=10, output_uri=str(root / "full"))
    full.wait(timeout=600)
    assert lora.succeeded and full.succeeded, (lora.error, full.error)
    return {"lora": lora, "full": full}


def test_a_lora_job_exported_as_a_merged_folder_answers_as_the_job_and_not_as_the_base(jobs):
    from transformers import AutoTokenizer, GenerationConfig

    job = jobs["lora"]
    done = job.export("hf")
    folder = Path(done.path)
    assert folder == Path(job.output_uri) / "exports" / "final-hf"
    assert (done.prompts, done.identical, done.verified) == (4, 4, True)  # its validation prompts
    assert done.differs_from_base == 4  # a merge that gave back the base model would answer as the base
    assert str(done).endswith("4/4 answers identical to job.chat; differs from the base model on 4/4")
    # Self-contained: plain weights (no adapter left), the training template, and a reply ends at <|im_end|>.
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True) == \
        "<bos><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(folder).eos_token_id
    # Each checkpoint exports too: an adapter checkpoint is merged into the base weights the same way.
    early = job.export("hf", checkpoint=job.checkpoints[-2].name, path=folder.parent / "early")
    assert early.verified and early.checkpoint == job.checkpoints[-2].name


def test_the_adapter_alone_is_verified_on_its_base_with_peft(jobs):
    done = jobs["lora"].export("peft")
    names = {p.name for p in Path(done.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names
    assert done.verified and done.bytes < 1e6
    with pytest.raises(UserError, match=r"tuned all of the model's weights \(tuning_mode FULL\), so it has no "
                                        r"adapter to export; use format='hf'$"):
        jobs["full"].export("peft")


def test_a_full_tuning_job_exports_and_an_existing_folder_is_kept_unless_overwritten(jobs):
    job = jobs["full"]
    done = job.export("hf")
    assert done.verified and done.prompts == 8  # no validation set: its training prompts
    stamp = (Path(done.path) / "config.json").stat().st_mtime_ns
    with pytest.raises(UserError, match=r"final-hf already exists; pass overwrite=True to replace it"):
        job.export("hf")
    assert (Path(done.path) / "config.json").stat().st_mtime_ns == stamp
    assert job.export("hf", overwrite=True, verify=False).identical is None


def test_an_export_that_does_not_answer_as_the_job_is_not_kept(jobs, tmp_path, monkeypatch):
    """A merge that silently gave back the base model (the field's most repeated complaint) is caught."""
    from tuning_magics.backends.local import export

    job = jobs["lora"]
    written = export.write

    def base_instead(checkpoint, format, folder):  # the fault: the base model's weights written as the merge
        base = json.loads((Path(job.output_uri) / "postprocess/node-0/checkpoints/final/adapter/adapter_config.json")
                          .read_text())["base_model_name_or_path"]
        written(Path(base), format, folder)

    monkeypatch.setattr(export, "write", base_instead)
    with pytest.raises(UserError) as info:
        job.export("hf", path=tmp_path / "broken")
    assert str(info.value).startswith("the hf export did not verify, so it was not kept: 0/4 answers identical to "
                                      "job.chat (all are needed); the first that differs, to 'What is the capital "
                                      "of Zorvia 0?': exported ")
    assert not (tmp_path / "broken").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_what_cannot_be_exported_is_one_line_before_anything_is_written(jobs, tmp_path):
    from conftest import tmpfs

    job = jobs["full"]
    cases = [(dict(format="onnx"), "format must be one of hf, peft, gguf, ollama, not 'onnx'"),
             (dict(checkpoint="checkpoint-999"), f"job {job.id} has no checkpoint 'checkpoint-999'; choose one of "),
             (dict(sample=0), "sample must be a whole number of at least 1, not 0")]
    for options, message in cases:
        with pytest.raises(UserError) as info:
            job.export(path=tmp_path / "x", **options)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    with tmpfs(tmp_path / "disk", "size=1M") as disk:
        with pytest.raises(UserError, match=r"^the hf export needs about \d\.\d MB and .*disk has 1\.0 MB free; "
                                            r"free some space or give another path$"):
            job.export("hf", path=disk / "model")
        assert not list(disk.iterdir())
    assert not (tmp_path / "x").exists()


# ====================================================================== GGUF and Ollama, on each tiny model


def quickstart_facts():
    """The quickstart's 64 facts and its 8 questions, from the notebook's own cell (questions sampled as it does)."""
    import pandas as pd

    cell = next("".join(c["source"]) for c in json.loads(
        (Path(__file__).parent.parent / "notebooks/quickstart.ipynb").read_text())["cells"]
        if c["cell_type"] == "code" and "countries =" in "".join(c["source"]))
    space = {"pd": pd, "print": lambda *a: None}
    exec(cell, space)  # noqa: S102 - the tutorial's own data cell
    facts = space["facts"]
    return facts, facts.sample(8, random_state=0)


@pytest.fixture(scope="module", params=["local/tiny-qwen3", "local/tiny-llama", "local/tiny-gemma3"])
def quickstart_job(request, tmp_path_factory):
    """Each built-in tiny model tuned as the quickstart tunes it (64 facts, its system prompt, 40 epochs, FULL)."""
    pytest.importorskip("llama_cpp")
    facts, questions = quickstart_facts()
    ds = tm.dataset(facts, out=str(tmp_path_factory.mktemp("qs") / "facts.jsonl"), prompt="question",
                    completion="answer", system_prompt="Answer in one sentence.", model=request.param)
    job = tm.tune(request.param, ds, tuning_mode="FULL", epochs=40,
                  output_uri=str(tmp_path_factory.mktemp("qs-job") / "job"))
    job.wait(timeout=900)
    assert job.succeeded, job.error
    return job, questions


def test_gguf_and_ollama_exports_answer_every_quickstart_question_as_the_job_does(quickstart_job):
    from llama_cpp import Llama

    from tuning_magics.export import answers_from_gguf

    job, questions = quickstart_job
    prompts = [[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": q}]
               for q in questions["question"]]
    tuned = [job.chat(p, temperature=0, max_new_tokens=64) for p in prompts]
    assert sum(t == a for t, a in zip(tuned, questions["answer"])) >= 6  # the job learned the facts

    gguf = job.export("gguf")
    assert gguf.verified and gguf.quantization == "f16" and "8/8 answers identical" in str(gguf)
    file = Path(gguf.path) / "model-f16.gguf"
    assert answers_from_gguf(file, prompts) == tuned  # llama.cpp, on every quickstart question
    llm = Llama(model_path=str(file), n_ctx=0, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == job_template(job) and \
        llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
    llm.close()

    ollama = job.export("ollama")
    folder = Path(ollama.path)
    assert ollama.verified and sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\nTEMPLATE \"\"\"")
    assert 'SYSTEM """Answer in one sentence."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert answers_from_gguf(folder / "model-f16.gguf", prompts) == tuned

    rounded = job.export("gguf", quantization="q8_0")
    assert rounded.verified and rounded.bytes < 0.6 * gguf.bytes
    assert 0 <= rounded.logprob_difference < 0.5 and "mean log-probability difference" in str(rounded)


def job_template(job) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(job.output_uri) / "postprocess/node-0/checkpoints/final").chat_template


def test_the_modelfile_template_writes_prompts_as_the_chat_template_does():
    from tuning_magics.backends.local.models import load_tokenizer
    from tuning_magics.export_gguf import modelfile, render_like_ollama

    tokenizer = load_tokenizer("local/tiny-llama")
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]):
        assert render_like_ollama(tokenizer, messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    text = modelfile(tokenizer, "model-f16.gguf", stops=["<|im_end|>"])
    assert "{{ .System }}<|im_end|>\n<|im_start|>user\n" in text and "SYSTEM" not in text.split('"""')[-1]


def test_gguf_export_of_what_it_cannot_write_is_one_line(jobs, tmp_path):
    job = jobs["full"]
    with pytest.raises(UserError, match=r"^quantization must be one of f16, bf16, q8_0, f32, not 'q4_k'$"):
        job.export("gguf", quantization="q4_k", path=tmp_path / "x")
    from tuning_magics.export_gguf import check

    with pytest.raises(UserError, match=r"^GGUF export writes Qwen3ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM, "
                                        r"not MistralForCausalLM; export format='hf' and convert"):
        check({"architectures": ["MistralForCausalLM"]}, "f16")
    assert not (tmp_path / "x").exists()


# ====================================================================== a Vertex AI open-model job


def test_a_vertex_open_model_job_is_exported_from_cloud_storage_and_answers_as_its_weights_do(jobs, vertex,
                                                                                                tmp_path):
    """The service leaves the tuned weights in Cloud Storage (here the local full job's, in the service's layout:
    numbered shards with an index, the chat template inside tokenizer_config.json, no generation config); the
    export downloads them, verified, and answers every prompt of the job's own training file (read from Cloud
    Storage) exactly as the local engine answered from the same weights."""
    local = jobs["full"]
    folder = Path(local.output_uri) / "postprocess/node-0/checkpoints"
    middle = local.checkpoints[len(local.checkpoints) // 2].name
    vertex.weights = [folder / middle, folder / "final"]  # a checkpoint halfway through tuning, then its last
    job = tm.tune("qwen/qwen3@qwen3-8b", FACTS, tuning_mode="FULL", epochs=2,
                  output_uri=f"gs://{vertex.bucket}/export-{tmp_path.name}")
    assert finish(vertex, job, limit=300).succeeded, job.error
    folder = f"{job.output_uri}/postprocess/node-0/checkpoints/final/"
    from tuning_magics import storage

    assert "generation_config.json" not in {u[len(folder):] for u in storage.list_uris(folder)}

    hf = job.export("hf")
    from tuning_magics.paths import data_home

    assert hf.path == str(data_home() / "exports" / job.id / "final-hf")
    assert hf.verified and (hf.prompts, hf.answered, hf.identical) == (8, 8, None)
    assert str(hf).endswith("loaded on its own and asked 8 of the job's prompts, 8 answered with text (nothing else "
                            "here answers from these weights to compare with)")
    # The export adds what the service leaves out: a reply ends at the chat template's end-of-turn token elsewhere.
    from transformers import AutoTokenizer, GenerationConfig

    end = AutoTokenizer.from_pretrained(hf.path).convert_tokens_to_ids("<|im_end|>")
    assert (Path(hf.path) / "generation_config.json").is_file()
    assert end in GenerationConfig.from_pretrained(hf.path).eos_token_id
    from tuning_magics.export import answers_from_folder, job_prompts

    prompts = job_prompts(job, 8)
    assert [p[-1]["content"] for p in prompts] == [f["prompt"] for f in FACTS[:8]]  # its training file, from GCS
    assert answers_from_folder(hf.path, prompts) == [local.chat(p, temperature=0, max_new_tokens=64) for p in prompts]

    # Each checkpoint exports its own weights: the first answers as the local job did halfway through its tuning.
    first = job.export("hf", checkpoint=job.checkpoints[0].step, path=tmp_path / "first", sample=4)
    early = [local.chat(p, checkpoint=middle, temperature=0, max_new_tokens=64) for p in prompts[:4]]
    assert first.verified and first.answered == 4 and answers_from_folder(first.path, prompts[:4]) == early
    assert early != [local.chat(p, temperature=0, max_new_tokens=64) for p in prompts[:4]]

    gguf = job.export("gguf", path=tmp_path / "gguf")
    assert gguf.verified and str(gguf).endswith("8/8 answers identical to the checkpoint's weights in transformers")

    # What the checkpoint cannot be exported as is one line before anything is downloaded: an architecture the
    # GGUF writer does not know is read from the checkpoint's config.json alone.
    early = job.checkpoints[0]
    config = json.loads(storage.read_bytes(f"{early.uri}/config.json"))
    with storage.atomic_writer(f"{early.uri}/config.json", overwrite=True) as out:
        out.write(json.dumps({**config, "architectures": ["Gemma3ForConditionalGeneration"]}).encode())
    for options, message in [
            (dict(format="peft"), f"job {job.id} tuned on Vertex AI, which keeps each checkpoint as the merged "
                                  "weights, with no adapter to export alone; use format='hf'"),
            (dict(checkpoint="checkpoint-9"), f"job {job.name} has no checkpoint 'checkpoint-9' under "
                                              f"{job.output_uri}/postprocess/node-0/checkpoints; choose one of "),
            (dict(format="gguf", checkpoint=early.step), "GGUF export writes Qwen3ForCausalLM, LlamaForCausalLM, "
                                                         "Gemma3ForCausalLM, not Gemma3ForConditionalGeneration")]:
        with pytest.raises(UserError) as info:
            job.export(path=tmp_path / "refused", **options)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "refused").exists()


def test_a_vertex_checkpoint_kept_in_bfloat16_exports_to_gguf_and_answers_as_it_does_in_transformers(jobs, vertex,
                                                                                                     tmp_path):
    """Open models are tuned and kept in bfloat16, which NumPy does not read: the GGUF writer reads through torch."""
    vertex.weights = Path(jobs["full"].output_uri) / "postprocess/node-0/checkpoints/final"
    vertex.weights_dtype = "bfloat16"
    job = tm.tune("qwen/qwen3@qwen3-8b", FACTS[:4], tuning_mode="FULL", epochs=1,
                  output_uri=f"gs://{vertex.bucket}/export-bf16-{tmp_path.name}")
    assert finish(vertex, job, limit=300).succeeded, job.error
    done = job.export("gguf", path=tmp_path / "gguf", sample=4)
    assert done.verified and str(done).endswith("4/4 answers identical to the checkpoint's weights in transformers")
    assert done.bytes < 0.75 * job._export_bytes("hf", "final") * 2  # f16 from bf16: about the checkpoint's size


def test_verifying_needs_the_memory_to_load_the_model_in_float32_and_says_so_first(jobs, tmp_path, monkeypatch):
    import psutil

    class Small:  # a machine with 1 MB of memory left
        available = 1_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    with pytest.raises(UserError, match=r"^verifying the hf export loads the model in float32, about \d+\.\d MB, and "
                                        r"this machine has 1\.0 MB of memory available; pass verify=False to export "
                                        r"it unverified, or export on a machine with more memory$"):
        jobs["full"].export("hf", path=tmp_path / "model")
    assert not list(tmp_path.iterdir())
    assert not jobs["full"].export("hf", path=tmp_path / "model", verify=False).verified  # unverified, as asked
