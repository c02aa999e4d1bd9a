"""Settings: validation messages, precedence with sources, config file errors, user paths."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.config.paths import UserPaths, ensure_dir, user_paths
from bluelm_cli.config.settings import describe, load_config_file, resolve_settings
from bluelm_cli.core.settings import SAMPLING_KEYS, SETTING_NAMES, SOURCE_CHECKPOINT, SPECS, SamplingSettings, parse_sampling_setting, parse_setting

KNOWN = ("model, source, device, dtype, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system, api,"
         " compile, kv_cache, quantize, context_shift, prompt_lookup, history")


# --------------------------------------------------------------------------- parse_setting
@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("temperature", "-1", "temperature must be a number from 0 to 2 (0 = greedy), got '-1'"),
        ("temperature", "2.5", "temperature must be a number from 0 to 2 (0 = greedy), got '2.5'"),
        ("temperature", "hot", "temperature must be a number from 0 to 2 (0 = greedy), got 'hot'"),
        ("temperature", "nan", "temperature must be a number from 0 to 2 (0 = greedy), got 'nan'"),
        ("top_p", "2", "top_p must be a number greater than 0 and at most 1, got '2'"),
        ("top_p", "0", "top_p must be a number greater than 0 and at most 1, got '0'"),
        ("top_k", "-1", "top_k must be a whole number of at least 0 (0 disables it), got '-1'"),
        ("top_k", "1.5", "top_k must be a whole number of at least 0 (0 disables it), got '1.5'"),
        ("max_new_tokens", "0", "max_new_tokens must be a whole number of at least 1, got '0'"),
        ("repetition_penalty", "0.9", "repetition_penalty must be a number from 1.0 to 2.0 (1.0 = no penalty), got '0.9'"),
        ("seed", "-3", "seed must be a whole number from 0 to 2^63-1, or 'none' for a random seed, got '-3'"),
        ("source", "github", "source must be 'huggingface' or 'modelscope', got 'github'"),
        ("device", "gpu", "device must be 'auto', 'cuda', 'cuda:N' (N = GPU index) or 'cpu', got 'gpu'"),
        ("device", "cuda:x", "device must be 'auto', 'cuda', 'cuda:N' (N = GPU index) or 'cpu', got 'cuda:x'"),
        ("dtype", "int8", "dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got 'int8'"),
        ("compile", "maybe", "compile must be true or false, got 'maybe'"),
        ("model", "  ", "model must be a model id (e.g. vivo-ai/BlueLM-7B-Chat) or a local directory, got '  '"),
        ("temperature", True, "temperature must be a number from 0 to 2 (0 = greedy), got 'true'"),
        ("foo", "1", f"unknown setting 'foo'; known settings: {KNOWN}"),
    ],
)
def test_parse_errors_name_the_valid_range(name: str, raw: object, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_setting(name, raw)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert not str(info.value).startswith("Error")


@pytest.mark.parametrize(
    ("name", "raw", "value"),
    [
        ("temperature", "0", 0.0),
        ("temperature", "2", 2.0),
        ("temperature", 0.3, 0.3),
        ("top_p", "1", 1.0),
        ("top_k", "40", 40),
        ("top_k", 0, 0),
        ("max_new_tokens", "1", 1),
        ("max_new_tokens", 2048.0, 2048),
        ("repetition_penalty", "1", 1.0),
        ("seed", "42", 42),
        ("seed", "none", None),
        ("seed", None, None),
        ("system", "你是一个助手", "你是一个助手"),
        ("system", "", None),
        ("source", "ModelScope", "modelscope"),
        ("device", "cuda:1", "cuda:1"),
        ("device", "CPU", "cpu"),
        ("dtype", "bfloat16", "bfloat16"),
        ("compile", "off", False),
        ("compile", True, True),
        ("model", " /data/BlueLM-7B-Chat ", "/data/BlueLM-7B-Chat"),
    ],
)
def test_parse_accepts(name: str, raw: object, value: object) -> None:
    assert parse_setting(name, raw) == value


@given(st.floats(min_value=0, max_value=2, allow_nan=False))
def test_any_temperature_in_range_round_trips_as_text(value: float) -> None:
    assert parse_setting("temperature", repr(value)) == value


def test_defaults_pass_their_own_validation() -> None:
    for name, spec in SPECS.items():
        assert parse_setting(name, spec.default) == spec.default


def test_sampling_keys() -> None:
    assert SAMPLING_KEYS == ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "system")
    assert parse_sampling_setting("top_k", "5") == 5
    with pytest.raises(UsageError, match="device can't be changed in a running chat; restart with --device"):
        parse_sampling_setting("device", "cpu")
    with pytest.raises(UsageError, match="unknown setting 'bogus'"):
        parse_sampling_setting("bogus", "1")


# --------------------------------------------------------------------------- config file
def test_missing_config_file_is_empty(tmp_path: Path) -> None:
    assert load_config_file(tmp_path / "nope.toml") == {}


def test_config_file_values_are_parsed(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('model = "/data/BlueLM-7B-Chat"\ntemperature = 0.3\ntop_k = "40"\ncompile = false\n', "utf-8")
    assert load_config_file(path) == {"model": "/data/BlueLM-7B-Chat", "temperature": 0.3, "top_k": 40, "compile": False}


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('model = "x"\ntemperature = = 3\n', "utf-8")
    with pytest.raises(BlueLMError) as info:
        load_config_file(path)
    message = str(info.value)
    assert not isinstance(info.value, UsageError)
    assert str(path) in message and "line 2" in message and "not valid TOML" in message
    assert "\n" not in message


def test_unknown_config_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("temprature = 0.5\n", "utf-8")
    with pytest.raises(BlueLMError) as info:
        load_config_file(path)
    assert str(info.value) == f"config file {path}: unknown setting 'temprature'; known settings: {KNOWN}"


def test_an_api_key_in_the_config_file_says_where_a_key_goes(tmp_path: Path) -> None:
    # `bluelm config` lists api_key among the settings, so people put it in the file; "unknown setting" and a
    # list without it left them guessing. The key itself is never repeated.
    path = tmp_path / "config.toml"
    path.write_text('api_key = "sk-secret-123"\n', "utf-8")
    with pytest.raises(BlueLMError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"config file {path}: the API key is not read from the config file; remove that line and put the key in"
        " BLUELM_API_KEY, or in a file of its own (chmod 600) given as --api-key-file"
    )


def test_bad_config_value_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("temperature = -1\n", "utf-8")
    with pytest.raises(BlueLMError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"config file {path}, key 'temperature': temperature must be a number from 0 to 2 (0 = greedy), got '-1'"
    )


def test_config_tables_are_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[sampling]\ntemperature = 0.5\n", "utf-8")
    with pytest.raises(BlueLMError, match="unknown setting 'sampling'"):
        load_config_file(path)


# --------------------------------------------------------------------------- precedence
def _no_flags() -> dict[str, object | None]:
    return {name: None for name in SETTING_NAMES}


def test_defaults_when_nothing_set(tmp_path: Path) -> None:
    resolved = resolve_settings(_no_flags(), {}, tmp_path / "config.toml")
    assert resolved["model"] == "vivo-ai/BlueLM-7B-Chat"
    assert resolved["temperature"] == 0.7
    assert resolved["top_p"] == 0.9 and resolved["top_k"] == 0 and resolved["repetition_penalty"] == 1.1
    assert resolved["max_new_tokens"] == 512 and resolved["seed"] is None and resolved["system"] is None
    assert resolved["compile"] is True and resolved["device"] == "auto" and resolved["dtype"] == "auto"
    assert resolved["source"] == "huggingface"
    assert all(source == "default" for _, _, source in describe(resolved))


def test_precedence_flag_env_file_checkpoint_default(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model = "from-file"\ntemperature = 0.3\ntop_p = 0.5\n', "utf-8")
    flags = _no_flags() | {"temperature": "1.5"}
    env = {"BLUELM_MODEL": "from-env"}
    resolved = resolve_settings(flags, env, config)
    resolved.apply_checkpoint_defaults({"temperature": 0.2, "top_p": 0.1, "top_k": 5, "max_new_tokens": 100})

    rows = {name: (value, source) for name, value, source in describe(resolved)}
    assert [name for name, _, _ in describe(resolved)] == list(SETTING_NAMES)
    assert rows["temperature"] == (1.5, "flag")
    assert rows["model"] == ("from-env", "env BLUELM_MODEL")
    assert rows["top_p"] == (0.5, f"config file {config}")
    assert rows["top_k"] == (5, SOURCE_CHECKPOINT)
    assert rows["max_new_tokens"] == (100, "checkpoint generation_config.json")
    assert rows["repetition_penalty"] == (1.1, "default")


def test_flag_beats_env_and_file_for_model(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model = "from-file"\n', "utf-8")
    resolved = resolve_settings(_no_flags() | {"model": "from-flag"}, {"BLUELM_MODEL": "from-env"}, config)
    assert (resolved["model"], resolved.source_of("model")) == ("from-flag", "flag")
    resolved = resolve_settings(_no_flags(), {"BLUELM_MODEL": ""}, config)
    assert (resolved["model"], resolved.source_of("model")) == ("from-file", f"config file {config}")


def test_bad_flag_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"top_p must be a number greater than 0 and at most 1, got '2'"):
        resolve_settings({"top_p": "2"}, {}, tmp_path / "config.toml")
    with pytest.raises(UsageError, match="unknown setting 'nope'"):
        resolve_settings({"nope": "2"}, {}, tmp_path / "config.toml")


def test_typed_flags_are_accepted(tmp_path: Path) -> None:
    resolved = resolve_settings({"temperature": 0.0, "seed": 7, "compile": False}, {}, tmp_path / "c.toml")
    assert (resolved["temperature"], resolved["seed"], resolved["compile"]) == (0.0, 7, False)


def test_checkpoint_do_sample_false_means_greedy(tmp_path: Path) -> None:
    resolved = resolve_settings(_no_flags(), {}, tmp_path / "config.toml")
    changed = resolved.apply_checkpoint_defaults({"do_sample": False, "temperature": 0.8, "bos_token_id": 1})
    assert resolved["temperature"] == 0.0
    assert resolved.source_of("temperature") == SOURCE_CHECKPOINT
    assert changed == ["temperature"]


def test_checkpoint_does_not_override_user_choices_or_bad_values(tmp_path: Path) -> None:
    resolved = resolve_settings(_no_flags() | {"temperature": "0.5"}, {}, tmp_path / "config.toml")
    resolved.apply_checkpoint_defaults({"do_sample": False, "top_p": 5.0, "repetition_penalty": None})
    assert (resolved["temperature"], resolved.source_of("temperature")) == (0.5, "flag")
    assert (resolved["top_p"], resolved.source_of("top_p")) == (0.9, "default")
    assert resolved.source_of("repetition_penalty") == "default"
    assert resolved.apply_checkpoint_defaults({}) == []


def test_checkpoint_without_do_sample_keeps_sampling(tmp_path: Path) -> None:
    resolved = resolve_settings(_no_flags(), {}, tmp_path / "config.toml")
    resolved.apply_checkpoint_defaults({"bos_token_id": 1, "eos_token_id": 2})
    assert resolved["temperature"] == 0.7 and resolved.source_of("temperature") == "default"


# --------------------------------------------------------------------------- SamplingSettings
def test_sampling_settings_from_resolved_and_replace(tmp_path: Path) -> None:
    resolved = resolve_settings(_no_flags() | {"seed": "3"}, {}, tmp_path / "config.toml")
    sampling = SamplingSettings.from_resolved(resolved)
    assert sampling == SamplingSettings(512, 0.7, 0.9, 0, 1.1, 3)
    # dataclasses.replace validates raw values through the table, like the constructor.
    greedy = dataclasses.replace(sampling, temperature="0", top_k=10)
    assert greedy.greedy and greedy.top_k == 10 and not sampling.greedy
    assert sampling.temperature == 0.7  # frozen copy
    with pytest.raises(UsageError, match="temperature must be a number from 0 to 2"):
        dataclasses.replace(sampling, temperature="9")
    with pytest.raises(TypeError, match="system"):
        dataclasses.replace(sampling, system="x")  # not a sampling setting
    with pytest.raises(TypeError, match="tempo"):
        dataclasses.replace(sampling, tempo=1)
    with pytest.raises(UsageError):
        SamplingSettings(top_p=0)
    assert SamplingSettings.from_mapping({"top_k": 3, "system": "ignored"}).top_k == 3


# --------------------------------------------------------------------------- paths
def test_bluelm_home_moves_everything(tmp_path: Path) -> None:
    paths = user_paths({"BLUELM_HOME": str(tmp_path / "h")})
    assert paths == UserPaths(
        config_file=tmp_path / "h" / "config.toml",
        data_dir=tmp_path / "h" / "data",
        sessions_dir=tmp_path / "h" / "sessions",
        history_file=tmp_path / "h" / "data" / "history",
    )
    assert not (tmp_path / "h").exists()  # nothing is created eagerly


def test_conftest_sets_bluelm_home(isolated_home: Path) -> None:
    assert user_paths().config_file == isolated_home / "bluelm" / "config.toml"


def test_platform_dirs_without_bluelm_home() -> None:
    import platformdirs

    paths = user_paths({})
    assert paths.config_file == Path(platformdirs.user_config_dir("bluelm", appauthor=False)) / "config.toml"
    data = Path(platformdirs.user_data_dir("bluelm", appauthor=False))
    assert paths.sessions_dir == data / "sessions" and paths.history_file == data / "history"


def test_ensure_dir(tmp_path: Path) -> None:
    target = ensure_dir(tmp_path / "a" / "b")
    assert target.is_dir() and (target.stat().st_mode & 0o777) == 0o700
    assert ensure_dir(target) == target
    (tmp_path / "file").write_text("x")
    with pytest.raises(BlueLMError, match="cannot create directory"):
        ensure_dir(tmp_path / "file" / "sub")
