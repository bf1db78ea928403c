"""Node settings: defaults, validation naming the key, env overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from warmstart import config
from warmstart.config import ConfigError, Settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_defaults_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CONFIG", str(tmp_path / "nope.toml"))
    assert config.load() == Settings()
    assert config.load(tmp_path / "also-nope.toml") == Settings()


def test_reads_values(tmp_path, monkeypatch):
    p = write(tmp_path, 'store = "/s"\nrunc = "/opt/runc"\nmax_restore_failures = 5\ndump_timeout_s = 60\n'
                        'secret_env_patterns = ["*TOK*"]\n')
    monkeypatch.setenv("WARMSTART_CONFIG", str(p))
    s = config.load()
    assert s.store == Path("/s") and s.runc == Path("/opt/runc")
    assert s.max_restore_failures == 5 and s.dump_timeout_s == 60 and s.secret_env_patterns == ("*TOK*",)
    assert s.seal_dir == Settings().seal_dir
    assert s.config_source == str(p)


@pytest.mark.parametrize("text, key", [
    ('stroe = "/s"', "stroe"),
    ('store = "relative/path"', "store"),
    ('state_dir = 5', "state_dir"),
    ('runc = ""', "runc"),
    ('max_restore_failures = 0', "max_restore_failures"),
    ('max_restore_failures = true', "max_restore_failures"),
    ('dump_timeout_s = "600"', "dump_timeout_s"),
    ('dump_timeout_s = 1.5', "dump_timeout_s"),
    ('secret_env_patterns = "*KEY*"', "secret_env_patterns"),
    ('secret_env_patterns = [1]', "secret_env_patterns"),
    ('[store]\npath = "/x"', "store"),
    ('restore_read_threads = -1', "restore_read_threads"),
    ('restore_read_threads = 65', "restore_read_threads"),
    ('restore_read_threads = "4"', "restore_read_threads"),
    ('restore_read_threads = false', "restore_read_threads"),
])
def test_bad_values_name_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        config.load(write(tmp_path, text))


def test_restore_read_threads_zero_means_automatic(tmp_path):
    assert Settings().restore_read_threads == 0
    assert config.load(write(tmp_path, "restore_read_threads = 0\n")).restore_read_threads == 0
    assert config.load(write(tmp_path, "restore_read_threads = 4\n")).restore_read_threads == 4


def test_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(write(tmp_path, "store = \n"))


def test_directory_as_config(tmp_path):
    with pytest.raises(ConfigError):
        config.load(tmp_path)


def test_warmstart_store_env(tmp_path, monkeypatch):
    p = write(tmp_path, 'store = "/from/file"\n')
    monkeypatch.setenv("WARMSTART_STORE", "/from/env")
    assert config.load(p).store == Path("/from/env")
    monkeypatch.setenv("WARMSTART_STORE", "relative")
    with pytest.raises(ConfigError, match="WARMSTART_STORE"):
        config.load(p)
    monkeypatch.setenv("WARMSTART_STORE", "")
    assert config.load(p).store == Path("/from/file")


def test_registry_section(tmp_path):
    assert not Settings().registry.enabled
    got = config.load(write(tmp_path, 'criu = "/usr/sbin/criu"\n[registry]\nrepository = "reg.local:5000/ws/ckpt"\n'
                                      'auth_file = "/etc/warmstart/auth.json"\ntls_verify = false\npush = "off"\n'
                                      'pull = "prefetch"\npull_deadline_s = 20\ncache_budget_bytes = 1073741824\n'
                                      'chunk_bytes = 67108864\ncompress = "none"\ncompress_level = 3\n')).registry
    assert got == config.RegistrySettings("reg.local:5000/ws/ckpt", Path("/etc/warmstart/auth.json"), False, "off",
                                          "prefetch", 20, 1 << 30, 64 << 20, "none", 3)
    assert got.enabled


@pytest.mark.parametrize("line,needle", [
    ('repository = "https://reg/x"', "registry.repository must be host"),
    ('repository = "reg/x:tag"', "registry.repository must be host"),
    ('repository = "reg/UPPER"', "registry.repository must be host"),
    ('auth_file = "auth.json"', "registry.auth_file must be an absolute path"),
    ('tls_verify = "no"', "registry.tls_verify must be true or false"),
    ('push = "on"', "registry.push must be one of 'auto', 'off'"),
    ('pull = "always"', "registry.pull must be one of 'on-miss', 'prefetch', 'off'"),
    ("pull_deadline_s = 120", "registry.pull_deadline_s must be an integer from 1 to 110"),
    ("pull_deadline_s = 0", "registry.pull_deadline_s"),
    ("chunk_bytes = 4096", "registry.chunk_bytes must be an integer from 1048576"),
    ('compress = "gzip"', "registry.compress must be one of 'zstd', 'none'"),
    ("compress_level = 22", "registry.compress_level must be an integer from 1 to 19"),
    ("cache_budget_bytes = -1", "registry.cache_budget_bytes"),
    ("chunk_size = 1", "registry.chunk_size: unknown key; valid keys: auth_file"),
])
def test_registry_bad_values_name_the_key(tmp_path, line, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
        config.load(write(tmp_path, f"[registry]\n{line}\n"))
    assert "\n" not in str(e.value)


def test_registry_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match=r"registry must be a table: write it as a \[registry\] section"):
        config.load(write(tmp_path, 'registry = "reg/x"\n'))


def test_registry_example_loads():
    """config/warmstart/registry.toml, the documented example, is a valid config."""
    example = Path(__file__).resolve().parents[2] / "config" / "warmstart" / "registry.toml"
    assert config.load(example).registry.repository == "registry.local:5000/warmstart/checkpoints"


def test_shared_store_section(tmp_path):
    assert not Settings().shared_store.enabled and not Settings().shared_store.fetches_on_miss
    got = config.load(write(tmp_path, '[shared_store]\npath = "/mnt/share"\npublish = "off"\nfetch = "on-miss"\n'
                                      'fetch_deadline_s = 20\n')).shared_store
    assert got == config.SharedStoreSettings(Path("/mnt/share"), "off", "on-miss", 20)
    assert got.enabled and got.fetches_on_miss and not got.publishes


@pytest.mark.parametrize("line,needle", [
    ('path = "share"', "shared_store.path must be the absolute path of the shared mount"),
    ('path = "/"', "shared_store.path must be the absolute path"),
    ("path = 5", "shared_store.path must be the absolute path"),
    ('publish = "on"', "shared_store.publish must be one of 'auto', 'off'"),
    ('fetch = "prefetch"', "shared_store.fetch must be one of 'on-miss', 'off'"),
    ("fetch_deadline_s = 0", "shared_store.fetch_deadline_s must be an integer from 1 to 110"),
    ("fetch_deadline_s = 111", "shared_store.fetch_deadline_s must be an integer from 1 to 110"),
    ('fetch_deadline_s = "30"', "shared_store.fetch_deadline_s"),
    ('dir = "/x"', "shared_store.dir: unknown key; valid keys: fetch, fetch_deadline_s, path, publish"),
])
def test_shared_store_bad_values_name_the_key(tmp_path, line, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
        config.load(write(tmp_path, f"[shared_store]\n{line}\n"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("top, share", [
    ('store = "/srv/ws"', "/srv/ws"),
    ('store = "/srv/ws"', "/srv/ws/share"),
    ('store = "/srv/ws/store"', "/srv/ws"),
    ('seal_dir = "/srv/seals"', "/srv/seals/x"),
])
def test_shared_store_must_not_overlap_the_store_or_seals(tmp_path, top, share):
    key = top.split()[0]
    with pytest.raises(ConfigError, match=f"shared_store.path '{share}' overlaps {key} .*; mount the share elsewhere"):
        config.load(write(tmp_path, f'{top}\n[shared_store]\npath = "{share}"\n'))


def test_shared_store_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match=r"shared_store must be a table: write it as a \[shared_store\] section"):
        config.load(write(tmp_path, 'shared_store = "/mnt/share"\n'))


def test_shared_store_example_loads():
    """config/warmstart/shared-store.toml, the documented example, is a valid config."""
    example = Path(__file__).resolve().parents[2] / "config" / "warmstart" / "shared-store.toml"
    got = config.load(example).shared_store
    assert got.path == Path("/mnt/warmstart-share") and got.publishes and got.fetches_on_miss
