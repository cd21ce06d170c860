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


def test_no_labels_needs_the_teacher(tmp_path):
    path = write_config(tmp_path, router={"label_weight": 0, "teacher_weight": 0})
    with pytest.raises(ConfigError, match="label_weight is 0"):
        load(path)
    path = write_config(tmp_path, router={"label_weight": 0}, dataset={"teacher": {"enabled": False}})
    with pytest.raises(ConfigError, match="dataset.teacher.enabled"):
        load(path)
    assert load(write_config(tmp_path, router={"label_weight": 0}))["router"]["teacher_weight"] > 0


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
    from moegate.llm import OpenAISettings
    from moegate.models.dact import HeadConfig
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


# -- renamed keys: router.lambda_ -> router.ponder_cost (and the grid, the λ study's search space) ------
def test_a_renamed_key_loads_with_a_deprecation_warning_and_equals_the_new(tmp_path):
    for name in ("new", "old"):
        (tmp_path / name).mkdir()
    new = load(write_config(tmp_path / "new", router={"ponder_cost": 0.05, "ponder_cost_grid": [0.0, 0.1]},
                            tuning={"lambda": {"search_space": {
                                "router.ponder_cost": {"type": "float", "low": 0.01, "high": 0.1}}}}))
    with pytest.warns(FutureWarning) as caught:
        old = load(write_config(tmp_path / "old", router={"lambda_": 0.05, "lambda_grid": [0.0, 0.1]},
                                tuning={"lambda": {"search_space": {
                                    "router.lambda_": {"type": "float", "low": 0.01, "high": 0.1}}}}))
    messages = [str(w.message) for w in caught]
    for old_key, new_key in (("router.lambda_", "router.ponder_cost"), ("router.lambda_grid", "router.ponder_cost_grid")):
        assert any(f"{old_key} is deprecated, renamed {new_key}" in m for m in messages), messages
    assert any("tuning.lambda.search_space: router.lambda_ is deprecated" in m for m in messages), messages
    assert all(m.startswith(str(tmp_path / "old" / "config.yaml")) for m in messages)  # names the file
    old.pop("results"), new.pop("results")
    assert old == new and "lambda_" not in old["router"]
    with pytest.warns(FutureWarning, match="override: router.lambda_ is deprecated"):
        assert load(tmp_path / "new" / "config.yaml", overrides={"router.lambda_": 0.3})["router"]["ponder_cost"] == 0.3


def test_the_old_and_the_new_name_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"both router\.lambda_ \(deprecated\) and router\.ponder_cost are set; "
                                          r"keep only router\.ponder_cost"):
        load(write_config(tmp_path, router={"lambda_": 0.1, "ponder_cost": 0.2}))
    space = {"router.lambda_": {"type": "float", "low": 0.01, "high": 0.1},
             "router.ponder_cost": {"type": "float", "low": 0.01, "high": 0.1}}
    with pytest.raises(ConfigError, match=r"tuning\.lambda\.search_space has both router\.lambda_"):
        load(write_config(tmp_path, tuning={"lambda": {"search_space": space}}))


def test_the_schema_knows_only_the_new_names():
    router = yaml.safe_load((REPO / "src" / "moegate" / "config.schema.yaml").read_text())["properties"]["router"]
    assert {"ponder_cost", "ponder_cost_grid"} <= set(router["properties"])
    assert not {"lambda_", "lambda_grid"} & set(router["properties"])


def test_a_removed_key_is_dropped_with_a_warning_and_the_schema_refuses_it_otherwise(tmp_path):
    slurm = {"partition": "gpu", "time_min": 20}  # tuning.slurm: the resources of the gone `moegate tune launch`
    with pytest.warns(FutureWarning, match=r"tuning\.slurm is no longer read and was ignored \(moegate tune launch"):
        config = load(write_config(tmp_path, tuning={"slurm": slurm}))
    assert "slurm" not in config["tuning"]
    tuning = yaml.safe_load((REPO / "src" / "moegate" / "config.schema.yaml").read_text())["properties"]["tuning"]
    assert "slurm" not in tuning["properties"] and tuning["additionalProperties"] is False


def test_a_tuned_json_with_the_old_key_is_applied_under_the_new(tmp_path):
    from moegate.io import write_json
    from moegate.layout import Layout
    from moegate.tuned import apply_tuned

    config = load(write_config(tmp_path))
    path = Layout.from_config(config).tuned("lambda")
    write_json(path, {"study": "moegate-lambda", "params": {"router.lambda_": 0.02}})
    with pytest.warns(FutureWarning, match=rf"{path}: params: router.lambda_ is deprecated, renamed router.ponder_cost"):
        tuned, used = apply_tuned(config, ("lambda",))
    assert tuned["router"]["ponder_cost"] == 0.02 and "lambda_" not in tuned["router"]
    assert used["lambda"]["params"] == {"router.lambda_": 0.02}  # recorded as the file says


def test_one_setter_of_dotted_keys_names_the_key_it_cannot_set():
    from moegate.config import get_dotted, set_dotted

    config = {"router": {"head": {"width": 8}, "epochs": 2}}
    set_dotted(config, "router.head.width", 16)
    assert get_dotted(config, "router.head.width") == 16
    with pytest.raises(ConfigError, match="router.nope.width: the config has no section 'router.nope'"):
        set_dotted(config, "router.nope.width", 1)
    with pytest.raises(ConfigError, match=r"router.epochs.x: the config has a value \(2\), not a section, at 'router.epochs'"):
        set_dotted(config, "router.epochs.x", 1)
    set_dotted(config, "backbone.epochs", 3, create=True)  # overrides of a config not yet filled with defaults
    assert config["backbone"] == {"epochs": 3}
    assert get_dotted(config, "router.nope", None) is None
