"""The model catalog (MISSION.md's table) and the settings precedence."""

from __future__ import annotations

import pytest

from tuning_magics import catalog
from tuning_magics.errors import UserError
from tuning_magics.config import Settings

FULL, PEFT = catalog.FULL, catalog.PEFT

# MISSION.md, "Supported models (catalog facts)", brought to the open-model tuning page of 2026-12-06
# (catalog.py names the sources): Gemma 4, Medgemma 1.5 4B IT (instead of Medgemma 4B IT) and Qwen 3.5 9B.
TABLE = [
    ("google/gemma4@gemma-4-e2b-it", (PEFT,), 8192, ("text",)),
    ("google/gemma4@gemma-4-e4b-it", (PEFT,), 8192, ("text",)),
    ("google/gemma4@gemma-4-26b-a4b-it", (PEFT,), 8192, ("text",)),
    ("google/gemma4@gemma-4-31b-it", (PEFT,), 8192, ("text",)),
    ("google/gemma3@gemma-3-1b-it", (FULL,), 8192, ("text",)),
    ("google/gemma3@gemma-3-4b-it", (FULL,), 8192, ("text",)),
    ("google/gemma3@gemma-3-12b-it", (FULL,), 8192, ("text",)),
    ("google/gemma3@gemma-3-27b-it", (PEFT, FULL), 8192, ("text",)),
    ("google/medgemma@medgemma-1.5-4b-it", (FULL,), 8192, ("text",)),
    ("meta/llama3_1@llama-3.1-8b", (PEFT, FULL), 8192, ("text",)),
    ("meta/llama3_1@llama-3.1-8b-instruct", (PEFT, FULL), 8192, ("text",)),
    ("meta/llama3-2@llama-3.2-1b-instruct", (FULL,), 8192, ("text",)),
    ("meta/llama3-2@llama-3.2-3b-instruct", (FULL,), 8192, ("text",)),
    ("meta/llama3-3@llama-3.3-70b-instruct", (PEFT, FULL), 8192, ("text",)),
    ("qwen/qwen3-5@qwen3.5-9b", (FULL,), 8192, ("text",)),
    ("qwen/qwen3@qwen3-4b", (FULL,), 8192, ("text",)),
    ("qwen/qwen3@qwen3-8b", (FULL,), 8192, ("text",)),
    ("qwen/qwen3@qwen3-14b", (FULL,), 8192, ("text",)),
    ("qwen/qwen3@qwen3-32b", (PEFT, FULL), 8192, ("text",)),
    ("meta/llama4@llama-4-scout-17b-16e-instruct", (PEFT,), 2048, ("text", "image")),
]
TEACHERS = {"deepseek-ai/deepseek-r1-0528-maas", "deepseek-ai/deepseek-v3.2-maas", "qwen/qwen3-next-80b-a3b-thinking-maas"}
STUDENTS = {
    "qwen/qwen3@qwen3-4b", "qwen/qwen3@qwen3-8b", "qwen/qwen3@qwen3-14b", "qwen/qwen3@qwen3-32b",
    "google/gemma3@gemma-3-1b-it", "google/gemma3@gemma-3-4b-it", "google/gemma3@gemma-3-12b-it", "google/gemma3@gemma-3-27b-it",
}  # fmt: skip
REGIONS = {"us-central1", "europe-west4", "us-west1", "us-east5", "asia-southeast1"}


# -- catalog ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_id", "modes", "max_seq", "modalities"), TABLE)
def test_every_model_of_the_table_is_in_the_catalog(model_id, modes, max_seq, modalities):
    model = catalog.get(model_id)
    assert model.id == model_id
    assert set(model.modes) == set(modes)
    assert model.max_seq_len == max_seq
    assert set(model.modalities) == set(modalities)
    assert model.multimodal is ("image" in modalities)
    assert model.provider == "open"


def test_open_models_are_exactly_the_table():
    assert {m.id for m in catalog.models(provider="open")} == {row[0] for row in TABLE}


def test_distillation_teachers():
    assert {t.id for t in catalog.teachers()} == TEACHERS
    assert catalog.get_teacher("deepseek-ai/deepseek-r1-0528-maas").thinking is True
    assert catalog.get_teacher("qwen/qwen3-next-80b-a3b-thinking-maas").thinking is True
    assert catalog.get_teacher("not/a-teacher") is None


def test_distillation_students():
    open_students = {m.id for m in catalog.models(provider="open", student=True)}
    assert open_students == STUDENTS
    assert "meta/llama3_1@llama-3.1-8b" not in {m.id for m in catalog.models(student=True)}


def test_regions():
    assert set(catalog.REGIONS) == REGIONS
    for region in REGIONS:
        assert catalog.check_region(region) == region
    with pytest.raises(UserError) as info:
        catalog.check_region("us-east1")
    assert info.value.field == "location"
    assert "us-east1" in str(info.value) and "us-central1" in str(info.value)


def test_models_filter_by_mode():
    peft = {m.id for m in catalog.models(provider="open", mode=PEFT)}
    assert peft == {row[0] for row in TABLE if PEFT in row[1]}
    assert "google/gemma3@gemma-3-1b-it" not in peft


def test_max_validation_examples():
    assert catalog.MAX_VALIDATION_EXAMPLES == 5000


@pytest.mark.parametrize(
    ("spelling", "model_id"),
    [
        ("qwen3-4b", "qwen/qwen3@qwen3-4b"),
        ("Qwen/Qwen3-4B", "qwen/qwen3@qwen3-4b"),
        ("GEMMA-3-1B-IT", "google/gemma3@gemma-3-1b-it"),
        ("llama-4-scout-17b-16e-instruct", "meta/llama4@llama-4-scout-17b-16e-instruct"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta/llama3_1@llama-3.1-8b-instruct"),
    ],
)
def test_short_names_and_hugging_face_ids_resolve(spelling, model_id):
    assert catalog.get(spelling).id == model_id
    assert catalog.find(spelling).id == model_id


def test_find_returns_none_for_unknown_models():
    assert catalog.find("no/such@model") is None
    assert catalog.find(None) is None
    assert catalog.find("") is None


def test_get_suggests_close_names():
    with pytest.raises(UserError) as info:
        catalog.get("gemma-3-1b")
    message = str(info.value)
    assert info.value.field == "model"
    assert "'gemma-3-1b'" in message and "did you mean" in message and "gemma-3-1b-it" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("llama4", "meta/llama4@llama-4-scout-17b-16e-instruct"), ("gemma3", "google/gemma3@gemma-3-1b-it"), ("qwen3-5b", "qwen/qwen3@qwen3-4b")],
)
def test_get_suggests_catalog_ids_containing_or_resembling_the_name(typed, suggested):
    with pytest.raises(UserError) as info:
        catalog.get(typed)
    assert suggested in str(info.value)


def test_get_without_close_names_says_how_to_list_them():
    with pytest.raises(UserError) as info:
        catalog.get("zzzzzzzz")
    assert "tuning-magics models" in str(info.value)


def test_check_mode_rejects_peft_for_gemma_3_1b_naming_the_supported_mode():
    model = catalog.get("google/gemma3@gemma-3-1b-it")
    with pytest.raises(UserError) as info:
        catalog.check_mode(model, "PEFT_ADAPTER")
    message = str(info.value)
    assert info.value.field == "tuning_mode"
    assert "google/gemma3@gemma-3-1b-it" in message and "FULL" in message
    assert catalog.check_mode(model, "full") == FULL


@pytest.mark.parametrize("spelling", ["PEFT", "peft_adapter", "lora", "LoRA", "adapter"])
def test_check_mode_spellings(spelling):
    assert catalog.check_mode(catalog.get("google/gemma3@gemma-3-27b-it"), spelling) == PEFT


def test_check_mode_rejects_unknown_modes():
    with pytest.raises(UserError) as info:
        catalog.check_mode(catalog.get("qwen/qwen3@qwen3-32b"), "qlora")
    assert "qlora" in str(info.value) and info.value.field == "tuning_mode"


def test_llama4_scout_is_peft_only():
    scout = catalog.get("meta/llama4@llama-4-scout-17b-16e-instruct")
    with pytest.raises(UserError, match="PEFT_ADAPTER"):
        catalog.check_mode(scout, "FULL")


def test_gemini_models_are_lora_only():
    gemini = catalog.models(provider="gemini")
    assert gemini and all(m.modes == (PEFT,) for m in gemini)
    assert all(m.adapter_sizes for m in gemini)


# Gemini supervised tuning, from the 2026-11 documentation (catalog.py names the pages).
GEMINI = {
    "gemini-3.5-flash": (1, 2, 4, 8, 16),
    "gemini-3.5-flash-lite": (1, 2, 4, 8, 16),
    "gemini-3.1-flash-lite": (1, 2, 4, 8, 16),
    "gemini-2.5-pro": (1, 2, 4, 8),
    "gemini-2.5-flash": (1, 2, 4, 8, 16),
    "gemini-2.5-flash-lite": (1, 2, 4, 8, 16),
}


def test_gemini_models_are_exactly_the_documented_list():
    assert {m.id for m in catalog.models(provider="gemini")} == set(GEMINI)


@pytest.mark.parametrize(("model_id", "sizes"), GEMINI.items())
def test_gemini_adapter_sizes_and_limits(model_id, sizes):
    model = catalog.get(model_id)
    assert model.adapter_sizes == sizes
    assert model.modes == (PEFT,) and model.max_seq_len == 131072
    assert set(model.modalities) == {"text", "image", "audio", "video", "document"}


def test_gemini_2_5_pro_refuses_adapter_size_16():
    assert 16 not in catalog.get("gemini-2.5-pro").adapter_sizes
    assert 16 in catalog.get("gemini-2.5-flash").adapter_sizes


@pytest.mark.parametrize("gone", ["gemini-2.0-flash-001", "gemini-2.0-flash-lite-001"])
def test_discontinued_gemini_2_0_models_are_gone(gone):
    assert catalog.find(gone) is None


@pytest.mark.parametrize("model_id", ["gemini-3.5-flash", "gemini-3.5-flash-lite", "gemini-3.1-flash-lite"])
def test_gemini_3_models_are_found_by_id_and_tune_in_two_regions(model_id):
    model = catalog.find(model_id)
    assert model is not None and model.id == model_id and model.provider == "gemini"
    assert model.regions == ("us-central1", "europe-west4")
    assert catalog.check_region("us-central1", model) == "us-central1"
    assert catalog.check_region("europe-west4", model_id) == "europe-west4"


def test_region_rule_refuses_a_region_that_does_not_tune_the_model_in_one_line():
    with pytest.raises(UserError) as info:
        catalog.check_region("asia-southeast1", "gemini-3.1-flash-lite")
    message = str(info.value)
    assert info.value.field == "location"
    assert "asia-southeast1" in message and "gemini-3.1-flash-lite" in message
    assert "us-central1" in message and "europe-west4" in message
    assert "\n" not in message


def test_region_rule_for_open_models_is_unchanged():
    scout = catalog.get("meta/llama4@llama-4-scout-17b-16e-instruct")
    assert scout.regions == catalog.REGIONS
    for region in REGIONS:
        assert catalog.check_region(region, scout) == region
    with pytest.raises(UserError) as info:
        catalog.check_region("us-east1", scout)
    assert "us-east1" in str(info.value) and scout.id in str(info.value)


def test_models_without_a_region_rule_pass_any_region():
    # Gemini 2.5: the documented list could not be read whole, so the service decides.
    assert catalog.get("gemini-2.5-flash").regions is None
    assert catalog.check_region("asia-northeast1", "gemini-2.5-flash") == "asia-northeast1"
    assert catalog.check_region("anywhere", "local/tiny-qwen3") == "anywhere"


def test_continued_tuning_flags():
    assert {m.id for m in catalog.models(provider="gemini") if m.continued_tuning} == {
        "gemini-3.5-flash", "gemini-3.1-flash-lite", "gemini-2.5-pro",
    }  # fmt: skip
    assert not any(m.continued_tuning for m in catalog.models(provider="open"))


def test_gemini_prices_only_where_published():
    assert catalog.get("gemini-2.5-flash").price_per_million_tokens == 5.0
    assert catalog.get("gemini-2.5-pro").price_per_million_tokens == 25.0
    for model_id in ("gemini-3.5-flash", "gemini-3.5-flash-lite", "gemini-3.1-flash-lite"):
        assert catalog.get(model_id).price_per_million_tokens is None


@pytest.mark.parametrize(
    ("model_id", "train", "limit"),
    [
        ("gemini-2.5-flash", 100, 1000),  # up to 1000 validation examples whatever the training size
        ("gemini-3.5-flash", 10_000, 3000),  # over 1000: at most 30% of the training examples
        ("gemini-3.5-flash", 100_000, 5000),  # never more than 5000
        ("gemini-3.5-flash", None, 5000),
        ("qwen/qwen3@qwen3-4b", 100, 5000),  # open models: the flat limit
        (None, 100, 5000),
    ],
)
def test_validation_limit(model_id, train, limit):
    assert catalog.validation_limit(model_id, train) == limit


def test_the_fake_vertex_ai_accepts_exactly_what_the_catalog_offers():
    # tests/fake_vertex.py keeps its own copy of what the service accepts: a drift between the two fails here.
    import fake_vertex as fake

    assert {m.id for m in catalog.models(provider="open")} == fake.OPEN_MODELS
    assert {m.id for m in catalog.models(provider="gemini")} == fake.GEMINI_MODELS
    assert {m.id for m in catalog.models(provider="open", student=True)} == fake.STUDENTS
    assert {t.id for t in catalog.teachers()} == fake.TEACHERS
    assert set(catalog.REGIONS) == fake.OPEN_REGIONS
    for model in catalog.models(provider="open") + catalog.models(provider="gemini"):
        if model.regions is not None:
            assert set(model.regions) == fake.regions_for(model.id), model.id
        else:  # no rule here: the fake (the service) decides, in at least the open-model regions
            assert fake.regions_for(model.id) >= fake.OPEN_REGIONS, model.id


def test_new_open_models_resolve_from_their_short_and_hugging_face_names():
    assert catalog.get("gemma-4-26b-a4b-it").id == "google/gemma4@gemma-4-26b-a4b-it"
    assert catalog.get("Qwen/Qwen3.5-9B").id == "qwen/qwen3-5@qwen3.5-9b"
    assert catalog.get("medgemma-1.5-4b-it").id == "google/medgemma@medgemma-1.5-4b-it"
    assert catalog.find("google/medgemma@medgemma-4b-it") is None  # no longer listed
    with pytest.raises(UserError, match="supports tuning_mode PEFT_ADAPTER"):
        catalog.check_mode(catalog.get("gemma-4-e4b-it"), "FULL")


def test_table_has_a_row_per_model():
    df = catalog.table()
    assert len(df) == len(catalog.models())
    row = df.set_index("model").loc["meta/llama4@llama-4-scout-17b-16e-instruct"]
    assert row["max_seq_len"] == 2048 and "image" in row["modality"] and row["modes"] == PEFT


# -- settings ----------------------------------------------------------------------------------

_ENV_VARS = (
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_CLOUD_LOCATION",
    "TUNING_MAGICS_API_ENDPOINT",
    "TUNING_MAGICS_BACKEND",
    "TUNING_MAGICS_STAGING_BUCKET",
)


@pytest.fixture
def clean_env(monkeypatch):
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _pyproject(folder, body):
    (folder / "pyproject.toml").write_text(body, encoding="utf-8")


def test_defaults_without_any_configuration(tmp_path, clean_env):
    s = Settings(_start=tmp_path)
    assert s.project is None
    assert s.location == "us-central1"
    assert s.backend == "auto"
    assert s.staging_bucket is None and s.api_endpoint is None
    assert s.as_dict() == {
        "project": None, "location": "us-central1", "staging_bucket": None, "backend": "auto", "api_endpoint": None,
        "credentials": None, "mlflow": "false",
    }  # fmt: skip


def test_precedence_default_pyproject_env_session(tmp_path, clean_env):
    _pyproject(
        tmp_path,
        '[tool.tuning_magics]\nproject = "from-pyproject"\nlocation = "europe-west4"\n'
        'api_endpoint = "https://pyproject.example"\nstaging_bucket = "gs://py-bucket/tuning"\n',
    )
    nested = tmp_path / "notebooks" / "deep"
    nested.mkdir(parents=True)
    s = Settings(_start=nested)  # found by searching upwards
    assert (s.project, s.location, s.api_endpoint) == ("from-pyproject", "europe-west4", "https://pyproject.example")
    assert s.staging_bucket == "gs://py-bucket/tuning"
    assert "pyproject.toml" in s.describe()

    clean_env.setenv("GOOGLE_CLOUD_PROJECT", "from-env")
    clean_env.setenv("GOOGLE_CLOUD_LOCATION", "us-west1")
    clean_env.setenv("TUNING_MAGICS_API_ENDPOINT", "http://localhost:8080")
    assert (s.project, s.location, s.api_endpoint) == ("from-env", "us-west1", "http://localhost:8080")
    assert s.staging_bucket == "gs://py-bucket/tuning"  # not overridden: still from pyproject
    assert "environment" in s.describe()

    s.update(project="from-session", location="us-east5")
    assert (s.project, s.location, s.api_endpoint) == ("from-session", "us-east5", "http://localhost:8080")
    assert "session" in s.describe()

    s.update(project=None)  # removing a session value shows the layer below again
    assert s.project == "from-env"
    s.reset()
    assert s.location == "us-west1"


def test_pyproject_in_the_working_directory(tmp_path, clean_env):
    _pyproject(tmp_path, '[tool.tuning_magics]\nproject = "cwd-project"\n')
    clean_env.chdir(tmp_path)
    s = Settings()
    assert s.project == "cwd-project" and s.backend == "auto"


def test_pyproject_keys_may_use_dashes(tmp_path, clean_env):
    _pyproject(tmp_path, '[tool.tuning_magics]\nstaging-bucket = "gs://my-bucket/x"\n')
    assert Settings(_start=tmp_path).staging_bucket == "gs://my-bucket/x"


def test_a_pyproject_without_the_table_is_ignored(tmp_path, clean_env):
    _pyproject(tmp_path, '[project]\nname = "x"\n')
    assert Settings(_start=tmp_path).as_dict()["project"] is None


def test_empty_environment_variables_are_ignored(tmp_path, clean_env):
    clean_env.setenv("GOOGLE_CLOUD_PROJECT", "")
    assert Settings(_start=tmp_path).project is None


def test_open_models_go_to_vertex_with_a_project_and_stay_local_without(tmp_path, clean_env):
    from tuning_magics import backends
    from tuning_magics.config import settings

    clean_env.chdir(tmp_path)

    def home(model_id):
        return backends.choose(catalog.get(model_id), setting=lambda: settings.backend).name

    try:
        assert settings.backend == "auto" and home("qwen3-4b") == "local"
        clean_env.setenv("GOOGLE_CLOUD_PROJECT", "my-project")
        assert home("qwen3-4b") == "vertex"
        settings.update(backend="local")
        assert home("qwen3-4b") == "local"
        # A model with one home goes there whatever the settings say.
        assert home("gemini-2.5-flash") == "vertex" and home("local/tiny-qwen3") == "local"
        settings.reset()
        clean_env.setenv("TUNING_MAGICS_BACKEND", "local")
        assert home("qwen3-4b") == "local"
        clean_env.delenv("GOOGLE_CLOUD_PROJECT")
        clean_env.setenv("TUNING_MAGICS_BACKEND", "vertex")
        assert home("qwen3-4b") == "vertex"
        clean_env.setenv("GOOGLE_CLOUD_PROJECT", "   ")  # blank: no project
        clean_env.delenv("TUNING_MAGICS_BACKEND")
        assert settings.project is None and home("qwen3-4b") == "local"
    finally:
        settings.reset()


def test_attribute_assignment_is_a_session_update(tmp_path, clean_env):
    s = Settings(_start=tmp_path)
    s.project = "assigned"
    assert s.project == "assigned" and s.backend == "auto"


def test_a_toml_boolean_for_mlflow_is_taken(tmp_path, clean_env):
    _pyproject(tmp_path, '[tool.tuning_magics]\nmlflow = true\n')
    s = Settings(_start=tmp_path)
    assert s.mlflow == "true" and s.location == "us-central1"  # and every other setting still reads
    _pyproject(tmp_path, '[tool.tuning_magics]\nmlflow = false\n')
    assert Settings(_start=tmp_path).mlflow == "false"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("backend", "gpu"),
        ("staging_bucket", "my-bucket"),
        ("staging_bucket", "s3://bucket"),
        ("api_endpoint", "ftp://host"),
        ("api_endpoint", "localhost:8080"),
        ("api_endpoint", "https://"),
        ("location", "us central1"),
        ("location", "US-CENTRAL1"),
        ("location", "projects/p/locations/us-central1"),
        ("staging_bucket", "gs://B/tuning"),
        ("staging_bucket", "gs:///tuning"),
        ("project", "my project"),
        ("project", "projects/my-project"),
    ],
)
def test_bad_session_values_are_one_line_user_errors_naming_the_setting(tmp_path, clean_env, name, value):
    s = Settings(_start=tmp_path)
    with pytest.raises(UserError) as info:
        s.update(**{name: value})
    message = str(info.value)
    assert info.value.field == name
    assert name in message and repr(value) in message
    assert "\n" not in message
    assert getattr(s, name) != value  # nothing was stored


def test_unknown_setting_names_the_known_ones(tmp_path, clean_env):
    s = Settings(_start=tmp_path)
    with pytest.raises(UserError) as info:
        s.update(projcet="x", location="europe-west4")
    assert "projcet" in str(info.value) and "project" in str(info.value)
    assert s.location == "us-central1"  # the whole update was refused
    with pytest.raises(AttributeError):
        s.projcet  # noqa: B018


def test_bad_environment_values_are_user_errors(tmp_path, clean_env):
    clean_env.setenv("TUNING_MAGICS_API_ENDPOINT", "not-a-url")
    with pytest.raises(UserError) as info:
        Settings(_start=tmp_path).api_endpoint  # noqa: B018
    assert info.value.field == "api_endpoint" and "not-a-url" in str(info.value)


def test_bad_pyproject_values_are_user_errors(tmp_path, clean_env):
    _pyproject(tmp_path, '[tool.tuning_magics]\nbackend = "tpu"\n')
    with pytest.raises(UserError) as info:
        Settings(_start=tmp_path).backend  # noqa: B018
    assert "backend" in str(info.value) and "tpu" in str(info.value)


def test_unknown_pyproject_key_names_the_file(tmp_path, clean_env):
    _pyproject(tmp_path, '[tool.tuning_magics]\nregion = "us-central1"\n')
    with pytest.raises(UserError) as info:
        Settings(_start=tmp_path).location  # noqa: B018
    message = str(info.value)
    assert "pyproject.toml" in message and "'region'" in message and "location" in message
    assert "\n" not in message


def test_broken_pyproject_is_a_user_error(tmp_path, clean_env):
    _pyproject(tmp_path, "[tool.tuning_magics\nproject = \n")
    with pytest.raises(UserError) as info:
        Settings(_start=tmp_path).project  # noqa: B018
    assert "pyproject.toml" in str(info.value) and "TOML" in str(info.value)
    assert "\n" not in str(info.value)


def test_pyproject_is_parsed_once_and_again_when_it_changes(tmp_path, clean_env, monkeypatch):
    import os

    from tuning_magics import config

    _pyproject(tmp_path, '[tool.tuning_magics]\nproject = "first"\n')
    parsed = []
    real = config._parse_pyproject
    monkeypatch.setattr(config, "_parse_pyproject", lambda path: parsed.append(path) or real(path))
    s = Settings(_start=tmp_path)
    for _ in range(50):
        assert s.project == "first" and s.location == "us-central1"
    s.describe()
    assert len(parsed) == 1
    _pyproject(tmp_path, '[tool.tuning_magics]\nproject = "second-value"\n')
    stat = (tmp_path / "pyproject.toml").stat()
    os.utime(tmp_path / "pyproject.toml", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert s.project == "second-value"
    assert len(parsed) == 2


@pytest.mark.parametrize("value", [5, True, ["a"]])
def test_settings_are_text(tmp_path, clean_env, value):
    s = Settings(_start=tmp_path)
    with pytest.raises(UserError, match="project must be text"):
        s.update(project=value)
    literal = {5: "5", True: "true"}.get(value) if not isinstance(value, list) else '["a"]'
    _pyproject(tmp_path, f"[tool.tuning_magics]\nlocation = {literal}\n")
    with pytest.raises(UserError, match="location must be text"):
        s.location  # noqa: B018
