"""Settings of PROTOCOL section 1: flag over CHATSERVER_* environment over TOML file over default."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import attrs
import pytest

from chatserver.config import SETTINGS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "conf" / "chatserver.toml"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_without_file_environment_or_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config({}, {})
    assert (config.host, config.port) == ("127.0.0.1", 8888)
    assert config.state_dir == "./var" and config.db_path == Path("var/chatserver.db")
    assert config.max_body_size == 65536 and config.max_content_length == 10000
    assert config.history_size == 10000 and config.poll_max_events == 500 and config.shutdown_grace == 10.0
    assert (config.chat3_exchange, config.chat3_queue) == ("chat3.events", "chatserver.chat3")
    assert config.amqp_url == config.secret == config.trusted_origins == config.chat3_dead_letter_exchange == ""


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        'port = 7001\nhost = "127.0.0.2"\nmax_body_size = 1000\nchat3_queue = "from-file"\nshutdown_grace = 3\n',
    )
    environ = {
        "CHATSERVER_PORT": "7002",
        "CHATSERVER_MAX_BODY_SIZE": "2000",
        "CHATSERVER_HISTORY_SIZE": "77",
    }
    config = load_config({"port": 7003}, environ, path)
    assert config.port == 7003  # flag over environment over file
    assert config.max_body_size == 2000  # environment over file
    assert config.history_size == 77  # environment over default
    assert config.host == "127.0.0.2" and config.chat3_queue == "from-file"  # file over default
    assert config.shutdown_grace == 3.0 and isinstance(config.shutdown_grace, float)
    assert config.poll_max_events == 500  # default
    # A flag given as text (from the command line) is parsed like the environment.
    assert load_config({"port": "7004", "max_body_size": None}, environ, path).port == 7004
    assert load_config({"port": None}, environ, path).port == 7002
    assert load_config({}, {}, path).port == 7001


def test_chatserver_config_names_the_file_and_flag_beats_it(tmp_path: Path) -> None:
    by_env = write(tmp_path / "env.toml", "port = 7101\n")
    by_flag = write(tmp_path / "flag.toml", "port = 7102\n")
    assert load_config({}, {"CHATSERVER_CONFIG": by_env}).port == 7101
    assert load_config({}, {"CHATSERVER_CONFIG": by_env}, by_flag).port == 7102


def test_without_config_flag_or_variable_no_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "chatserver.toml", "port = 7201\n")
    write(tmp_path / "chatserver.toml", "port = 7202\n")
    monkeypatch.chdir(tmp_path)
    assert load_config({}, {}).port == 8888


def test_state_dir_defaults_to_systemd_state_directory(tmp_path: Path) -> None:
    assert load_config({}, {"STATE_DIRECTORY": "/var/lib/chatserver"}).state_dir == "/var/lib/chatserver"
    config = load_config({}, {"STATE_DIRECTORY": "/var/lib/one:/var/lib/two"})
    assert config.db_path == Path("/var/lib/one/chatserver.db")
    assert load_config({}, {"STATE_DIRECTORY": "/x", "CHATSERVER_STATE_DIR": "/y"}).state_dir == "/y"
    assert load_config({"db": str(tmp_path / "a.db")}, {"STATE_DIRECTORY": "/x"}).db_path == tmp_path / "a.db"


def test_trusted_origins_from_a_toml_list_or_comma_text(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'trusted_origins = ["https://a.example", "https://b.example/"]\n')
    assert load_config({}, {}, path).origins == {"https://a.example", "https://b.example"}
    environ = {"CHATSERVER_TRUSTED_ORIGINS": " https://c.example , ,https://d.example"}
    assert load_config({}, environ).origins == {"https://c.example", "https://d.example"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prot = 1\n", ("unknown setting", "prot")),
        ("[server]\nport = 1\n", ("unknown setting", "server")),
        ('port = "8888"\n', ("port", "int")),
        ("port = 1.5\n", ("port",)),
        ("port = true\n", ("port",)),
        ("host = 1\n", ("host", "str")),
        ("shutdown_grace = nan\n", ("shutdown_grace",)),
        ("shutdown_grace = inf\n", ("shutdown_grace",)),
        ("max_body_size = 0\n", ("max_body_size", "greater than 0")),
        ("port = 70000\n", ("port", "65535")),
        ('log_level = "loud"\n', ("log_level",)),
        ("port = \n", ("not valid TOML",)),
        ("workers = 0\n", ("workers", "auto")),
        ("workers = true\n", ("workers", "str")),
        ("workers = 1.5\n", ("workers",)),
        ('http_engine = "nginx"\n', ("http_engine", "lean, tornado", "'nginx'")),
        ("port = 1\nport = 2\n", ("not valid TOML",)),
    ],
)
def test_bad_file_is_a_config_error_naming_the_setting(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, path)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unreadable_or_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "binary.toml").write_bytes(b"port = 1\n\xff\xfe = 2\n")
    for path in (tmp_path / "binary.toml", tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as caught:
            load_config({}, {}, str(path))
        assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PORT", "eighty"),
        ("PORT", ""),
        ("PORT", "-1"),
        ("MAX_BODY_SIZE", "1.5"),
        ("SHUTDOWN_GRACE", "nan"),
        ("SHUTDOWN_GRACE", "inf"),
        ("SHUTDOWN_GRACE", "-2"),
        ("HISTORY_SIZE", "0"),
        ("LOG_LEVEL", "verbose"),
        ("TRUSTED_PROXIES", "10.0.0.1, proxy.local"),
        ("MESSAGE_RATE", "-1"),
        ("WORKERS", "0"),
        ("WORKERS", "²"),
        ("WORKERS", "-1"),
        ("WORKERS", "Auto"),
        ("WORKERS", "257"),
    ],
)
def test_bad_environment_value_is_a_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({}, {f"CHATSERVER_{name}": raw})
    assert name.lower() in str(caught.value)


def test_every_setting_comes_from_the_environment() -> None:
    samples = {"str": "x", "int": "7", "float": "2.5"}
    environ = {f"CHATSERVER_{name.upper()}": samples[str(field.type)] for name, field in SETTINGS.items()}
    environ["CHATSERVER_LOG_LEVEL"] = "debug"
    environ["CHATSERVER_AMQP_URL"] = "amqp://localhost"
    environ["CHATSERVER_TRUSTED_PROXIES"] = "10.0.0.1"
    environ["CHATSERVER_WORKERS"] = "3"
    environ["CHATSERVER_HTTP_ENGINE"] = "tornado"
    config = load_config({}, environ)
    special = {"log_level": "debug", "amqp_url": "amqp://localhost", "trusted_proxies": "10.0.0.1", "workers": "3",
               "http_engine": "tornado"}
    for name, field in SETTINGS.items():
        expected = special.get(name, samples[str(field.type)])
        assert str(getattr(config, name)) == expected, name


def _uncommented_template() -> str:
    """The template with every `# key = value` line turned on: what an operator gets by uncommenting."""
    lines = TEMPLATE.read_text(encoding="utf-8").splitlines()
    return "\n".join(re.sub(r"^# ([a-z0-9_]+ = )", r"\1", line) for line in lines) + "\n"


def test_the_template_loads_and_equals_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    defaults = load_config({}, {})
    assert load_config({}, {}, str(TEMPLATE)) == defaults
    turned_on = _uncommented_template()
    values = tomllib.loads(turned_on)
    assert set(values) == set(SETTINGS), "every Config field, and nothing else, is in conf/chatserver.toml"
    assert load_config({}, {}, write(tmp_path / "on.toml", turned_on)) == defaults
    for name, value in values.items():
        field_default = getattr(Config(), name)
        if name == "workers":  # a number or "auto": the template shows the number
            value = str(value)
        assert value == field_default, (
            f"conf/chatserver.toml shows {name} = {value!r}, the default is {field_default!r}"
        )
        assert isinstance(value, type(field_default)), name


def test_config_is_frozen() -> None:
    config = load_config({}, {})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_workers_is_a_number_or_auto_for_every_usable_core(tmp_path: Path) -> None:
    assert load_config({}, {}).worker_count == 1
    assert load_config({}, {}, write(tmp_path / "two.toml", "workers = 2\n")).worker_count == 2
    assert load_config({}, {"CHATSERVER_WORKERS": "3"}).worker_count == 3
    auto = load_config({"workers": "auto"}, {})
    assert auto.worker_count == len(os.sched_getaffinity(0))
