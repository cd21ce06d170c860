import pytest
import yaml

from moegate.config import ConfigError, load

from conftest import REPO, write_config


def test_shipped_config_is_valid_and_gets_defaults():
    cfg = load(REPO / "config.yaml")
    assert set(cfg["experts"]) == {"dsci_101", "dsci_dl_510", "dsci_vis_510"}
    assert cfg["synthesize"]["backend"] == "offline"
    assert cfg["dataset"]["max_train_rows_per_expert"] is None  # not in the file: the schema default


def test_defaults_fill_missing_sections(config_path):
    cfg = load(config_path)
    assert cfg["cluster"]["noise"] == "attach"
    assert cfg["synthesize"]["openai"]["max_retries"] == 3
    assert cfg["router"]["head"]["activation"] == "gelu"


def test_unknown_key_names_its_path(tmp_path):
    path = write_config(tmp_path, cluster={"min_cluster_sise": 4})
    with pytest.raises(ConfigError, match=r"cluster: Additional properties .*min_cluster_sise"):
        load(path)


def test_wrong_type_names_its_path(tmp_path):
    path = write_config(tmp_path, synthesize={"openai": {"concurrency": "four"}})
    with pytest.raises(ConfigError, match=r"synthesize\.openai\.concurrency: 'four' is not of type 'integer'"):
        load(path)


def test_bad_enum_and_missing_experts(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"cluster": {"noise": "ignore"}}))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert "'experts' is a required property" in str(e.value)
    assert "cluster.noise" in str(e.value)


def test_overlap_must_be_below_chunk(tmp_path):
    path = write_config(tmp_path, ingest={"chunk_tokens": 32, "chunk_overlap": 32})
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_overrides_apply_before_validation(config_path):
    cfg = load(config_path, overrides={"cluster.min_cluster_size": 7})
    assert cfg["cluster"]["min_cluster_size"] == 7
    with pytest.raises(ConfigError, match="cluster.min_cluster_size"):
        load(config_path, overrides={"cluster.min_cluster_size": "x"})


def test_urls_and_variable_names_without_secrets_pass(tmp_path):
    from moegate.config import looks_like_secret

    cfg = load(write_config(tmp_path, tuning={"storage": "postgresql+psycopg://bob@db:5432/x?sslmode=require"},
                            synthesize={"openai": {"base_url": "http://127.0.0.1:8080/v1", "api_key_env": "MY_KEY"}}))
    assert cfg["tuning"]["storage"].startswith("postgresql+psycopg://bob@")
    assert not any(map(looks_like_secret, ["OPENAI_API_KEY", "MOEGATE_DB_PASSWORD", "_k", "HF_TOKEN"]))
    assert all(map(looks_like_secret, ["sk-abc", "my key", "1ABC", "", "AIzaSyD3f", "x" * 20 + "aB3" * 5]))


@pytest.mark.parametrize(("sections", "key"), [
    ({"tuning": {"storage": "postgresql+psycopg://bob:hunter2@db/x"}}, "tuning.storage"),
    ({"synthesize": {"openai": {"base_url": "https://user:hunter2@host/v1"}}}, "synthesize.openai.base_url"),
    ({"synthesize": {"openai": {"api_key_env": "sk-hunter2"}}}, "synthesize.openai.api_key_env"),
    # a schema error in the same section is not reported first: its message would quote the section
    ({"tuning": {"storage": "postgresql+psycopg://bob:hunter2@db/x", "typo": 1}}, "tuning.storage"),
])
def test_a_secret_in_the_config_is_refused_without_echoing_it(tmp_path, sections, key):
    with pytest.raises(ConfigError, match=key) as e:
        load(write_config(tmp_path, **sections))
    assert "hunter2" not in str(e.value)


def test_settings_classes_take_their_defaults_from_the_schema():
    """HeadConfig, LoopSettings and OpenAISettings hold no defaults of their own: a bare constructor
    gives the schema's section, so a direct call and a config through config.load cannot drift apart."""
    from dataclasses import asdict

    from moegate.config import defaults
    from moegate.dact import HeadConfig
    from moegate.llm import OpenAISettings
    from moegate.training import LoopSettings

    assert HeadConfig().to_dict() == defaults("router.head")
    assert asdict(OpenAISettings()) == defaults("synthesize.openai")
    loop = asdict(LoopSettings())
    assert loop.pop("head_learning_rate") is None and loop.pop("seed") == defaults("seed")
    backbone = defaults("backbone")
    assert loop == {k: backbone[k] for k in loop}
    # the router section's loop keys differ from the backbone's only where the schema says so
    router = defaults("router")
    assert set(loop) <= set(router) and set(loop) <= set(router["probe"])
    with pytest.raises(KeyError, match="no config section 'router.nope'"):
        defaults("router.nope")
