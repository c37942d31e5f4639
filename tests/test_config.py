"""The Hydra config tree: every option composes and builds, and mistakes fail at compose time with a clear message."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from onthefly.config import CONF_DIR, compose, register_configs
from onthefly.models import MultimodalModel, build_model
from onthefly.modulation.base import Modulation

register_configs()  # imports the schema modules once, at collection rather than inside a test
torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch imports torch._dynamo on the first optimizer (~2 s)

ROOT = Path(__file__).resolve().parents[1]
GROUPS = (
    "dataset",
    "task",
    "backbone",
    "fusion",
    "modulation",
    "optim",
    "scheduler",
    "trainer",
    "logger",
    "paths",
    "discrepancy",
    "debug",
    "experiment",
)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
TINY_DATA = ["dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _cfg(*overrides: str):
    """compose() is deterministic for given overrides (and ~0.3 s): compose each set once per session."""
    return compose(list(overrides))


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, node


def _lookup(container: dict, path: tuple):
    for k in path:
        container = container[k]
    return container


def _error_text(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _schema_named(entry) -> str | None:
    """The schema a defaults-list entry names (`/OGM_schema@_here_` -> `OGM_schema`; `CremaD_schema` too), else None."""
    if not isinstance(entry, str):
        return None
    name = entry.split("@", 1)[0].lstrip("/")
    return name if name.endswith("_schema") else None


def test_options_were_found():
    found = {g for g, _ in OPTIONS}
    assert found == set(GROUPS)
    assert ("modulation", "opm_ogm") in OPTIONS and ("fusion", "mlp") in OPTIONS


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_with_its_own_values(group, option):
    path = CONF_DIR / group / f"{option}.yaml"
    cfg = _cfg(f"{group}={option}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    defaults = raw.pop("defaults", [])
    is_global = "@package _global_" in path.read_text().splitlines()[0]
    composed = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    base = composed if is_global else composed[group]
    for key, value in _leaves(raw):
        assert _lookup(base, key) == value, f"{group}={option}: {'.'.join(key)}"
    # an option that names a class schema builds that class
    for entry in defaults:
        schema = _schema_named(entry)
        if schema and schema != "backbone_schema":
            package = entry.split("@", 1)[1] if "@" in entry else "_here_"  # mid-fusion: @interaction, @head
            node = base if package == "_here_" else _lookup(base, tuple(package.split(".")))
            assert node["_target_"].rsplit(".", 1)[-1] == schema[: -len("_schema")]
    # the whole config resolves (interpolations, env defaults)
    OmegaConf.to_container(cfg, resolve=True)


def _generated(option: str) -> bool:
    """Datasets generated in memory (their schema has a train size); the others read a prepared cache."""
    return "num_train" in compose([f"dataset={option}"]).dataset


DATASETS = [o for g, o in OPTIONS if g == "dataset"]


@pytest.mark.parametrize("option", [o for o in DATASETS if o.startswith("synth")])
def test_dataset_options_build_tiny_splits(option):
    assert _generated(option)
    cfg = compose([f"dataset={option}", *TINY_DATA])
    splits = instantiate(cfg.dataset).splits()
    assert list(splits.modalities) == list(cfg.dataset.modalities)
    assert splits.num_classes == cfg.dataset.num_classes
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 8, 8)
    item = splits.train[0]
    assert set(cfg.dataset.modalities) <= set(item)
    assert 0 <= item["label"] < cfg.dataset.num_classes


@pytest.mark.parametrize("option", [o for o in DATASETS if not o.startswith("synth")])
def test_cache_backed_dataset_without_its_cache_names_the_prep_command(option, tmp_path, monkeypatch):
    from onthefly.data.base import CacheMissingError

    assert not _generated(option)
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path / "empty"))
    cfg = compose([f"dataset={option}"])
    with pytest.raises(CacheMissingError, match=r"make prep-"):
        instantiate(cfg.dataset).splits()


SEQUENCE_BACKBONES = ("transformer", "lstm")  # CMU-MOSI's feature-sequence encoders (text, audio, visual)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "backbone" and o not in SEQUENCE_BACKBONES])
def test_backbone_options_build_every_modality_encoder(option):
    overrides = [f"backbone={option}"]
    if option == "resnet18":
        overrides.append("backbone.width=4")  # same structure, far fewer parameters
    cfg = compose(overrides)
    modalities = list(cfg.backbone.encoders)
    assert {"audio", "visual", "sensor"} <= set(modalities)
    model = build_model(cfg, modalities, num_classes=3)
    assert isinstance(model, MultimodalModel)
    width = cfg.backbone.width
    assert model.feature_dims["audio"] == model.feature_dims["visual"] == 8 * width
    assert model.feature_dims["sensor"] == width
    model.eval()
    with torch.no_grad():
        out = model(
            {
                "audio": torch.randn(2, 1, 16, 16),
                "visual": torch.randn(2, 3, 16, 16),
                "sensor": torch.randn(2, cfg.backbone.encoders.sensor.in_dim),
            }
        )
    assert out.shape == (2, 3)


@pytest.mark.parametrize("option", SEQUENCE_BACKBONES)
def test_sequence_backbones_take_their_input_sizes_from_the_data(option):
    assert option in [o for g, o in OPTIONS if g == "backbone"]
    cfg = compose([f"backbone={option}", "backbone.width=8"])
    sizes = {"text": 7, "audio": 5, "visual": 3}
    model = build_model(cfg, list(sizes), num_classes=2, encoder_args={m: {"in_dim": d} for m, d in sizes.items()})
    assert model.feature_dims == {m: 8 for m in sizes}
    inputs = {m: {"x": torch.randn(2, 4, d), "length": torch.tensor([4, 2])} for m, d in sizes.items()}
    assert model.eval()(inputs).shape == (2, 2)


def test_backbone_without_a_modality_fails_with_a_clear_message():
    cfg = _cfg()
    with pytest.raises(ValueError, match="no encoder for modality"):
        build_model(cfg, ["audio", "depth"], num_classes=3)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "fusion"])
def test_fusion_options_instantiate(option):
    cfg = _cfg(f"fusion={option}")
    if "interaction" in cfg.fusion:  # mid-fusion: an interaction module over the encoders, then its head
        model = build_model(cfg, ["audio", "visual"], num_classes=3)
        assert type(model.head).__name__ == cfg.fusion.head._target_.rsplit(".", 1)[-1]
        assert type(model.interaction).__name__ == cfg.fusion.interaction._target_.rsplit(".", 1)[-1]
        x = {"audio": torch.randn(2, 1, 64, 32), "visual": torch.randn(2, 2, 3, 32, 32)}
        assert model(x).shape == (2, 3)
        return
    feats = {"audio": torch.randn(5, 8), "visual": torch.randn(5, 8)}
    if option.startswith("qa"):  # question-conditioned: the question (and 3 choices) come as context
        head = instantiate(
            cfg.fusion, feature_dims={"audio": 8, "visual": 8}, num_classes=3, context_dims={"question": 6}
        )
        feats["question"] = torch.randn(5, 4 if option == "qa" else 1, 6)
    else:
        head = instantiate(cfg.fusion, feature_dims={"audio": 8, "visual": 8}, num_classes=3)
    assert type(head).__name__ == cfg.fusion._target_.rsplit(".", 1)[-1]
    out = head(feats)
    assert out.shape == (5, 3)


# methods that only work on a particular model (they refuse others with a message; tests/test_complex_models.py)
METHOD_NEEDS = {"greedy": ("fusion=mmtm",)}


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "modulation"])
def test_modulation_options_instantiate_and_set_up(option):
    cfg = _cfg(f"modulation={option}", *METHOD_NEEDS.get(option, ()))
    method = instantiate(cfg.modulation)
    assert isinstance(method, Modulation)
    assert type(method).__name__ == cfg.modulation._target_.rsplit(".", 1)[-1]
    model = build_model(cfg, ["audio", "visual"], num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method.setup(model, 3)
    assert not [w for w in caught if "selects no parameter" in str(w.message)]  # ResNet encoders have convs


def test_ogm_overrides_reach_the_object():
    ogm = instantiate(compose(["modulation=ogm", "modulation.alpha=0.3", "modulation.end=7"]).modulation)
    assert ogm.alpha == pytest.approx(0.3) and ogm.noise == 0.0 and ogm.window.end == 7


def test_ogm_ge_noise_scale_reaches_the_object():
    assert instantiate(compose(["modulation=ogm_ge", "modulation.ge_scale=2"]).modulation).noise == pytest.approx(2.0)


def test_opm_ogm_nested_overrides_reach_both_parts():
    both = instantiate(
        compose(["modulation=opm_ogm", "modulation.ogm.alpha=2.6", "modulation.opm.p_exe=0.2"]).modulation
    )
    assert both.ogm.alpha == pytest.approx(2.6) and both.opm.p_exe == pytest.approx(0.2)
    assert both.ogm.noise == pytest.approx(1.0)  # opm_ogm uses OGM-GE


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "optim"])
def test_optim_options_build_an_optimizer(option):
    cfg = _cfg(f"optim={option}")
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optim)(params)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert type(optimizer).__name__ == cfg.optim._target_.rsplit(".", 1)[-1]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(cfg.optim.weight_decay)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "scheduler"])
def test_scheduler_options_build_a_scheduler(option):
    cfg = _cfg(f"scheduler={option}")
    optimizer = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(3))], lr=0.5)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    optimizer.step()
    scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    if option == "step":
        assert cfg.scheduler.step_size > 1 and lr == pytest.approx(0.5)  # no decay before step_size epochs
    else:
        assert lr == pytest.approx(0.5)


def test_step_scheduler_decays_after_step_size():
    cfg = compose(["scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.1", "optim.lr=1.0"])
    optimizer = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_debug_preset_wins_over_experiment():
    cfg = compose(["experiment=demo", "debug=fast"])
    assert cfg.trainer.epochs == 2  # demo says 12, debug is applied last
    assert cfg.trainer.threads == 1  # from demo, untouched by debug
    assert cfg.optim._target_ == "torch.optim.AdamW"
    assert cfg.logger.mode.value == "disabled"


def test_misspelt_key_fails_and_names_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["modulation=ogm_ge", "modulation.alpah=0.8"])
    assert "alpah" in _error_text(info.value)


def test_misspelt_nested_key_fails_and_names_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["modulation=opm_ogm", "modulation.ogm.alpah=0.8"])
    assert "modulation.ogm.alpah" in _error_text(info.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("trainer.batch_size=1.5", "trainer.batch_size"),
        ("seed=x", "seed"),
    ],
)
def test_wrong_type_fails_and_names_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert key in _error_text(info.value)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["fusion=nope"])
    assert "fusion/nope" in _error_text(info.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["modulation=ogm", "modulation.scope=bogus"], "modulation.scope"),
        (["modulation=ogm", "modulation.coeff_form=bogus"], "modulation.coeff_form"),
        (["modulation=opm", "modulation.rescale=bogus"], "modulation.rescale"),
        (["modulation=opm", "modulation.q_source=bogus"], "modulation.q_source"),
        (["modulation=opm_ogm", "modulation.opm.rescale=bogus"], "modulation.opm.rescale"),
        (["discrepancy.estimator=bogus"], "discrepancy.estimator"),
        (["discrepancy.reduce=bogus"], "discrepancy.reduce"),
        (["trainer.select_on=bogus"], "trainer.select_on"),
        (["logger.mode=bogus"], "logger.mode"),
    ],
)
def test_unknown_enum_value_fails_at_compose_time(overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose(overrides)
    text = _error_text(info.value)
    assert key in text and "bogus" in text


@pytest.mark.parametrize(
    "overrides,attr,value",
    [
        (["modulation=ogm", "modulation.scope=all"], "scope", "all"),
        (["modulation=ogm", "modulation.coeff_form=shifted"], "coeff_form", "shifted"),
        (["modulation=opm", "modulation.rescale=none"], "rescale", "none"),
        (["modulation=opm", "modulation.rescale=global"], "rescale", "global"),
        (["modulation=opm", "modulation.q_source=previous"], "q_source", "previous"),
    ],
)
def test_valid_enum_values_compose(overrides, attr, value):
    method = instantiate(compose(overrides).modulation)
    assert getattr(method, attr).value == value


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONTHEFLY_DATA", str(tmp_path))
    cfg = compose([])
    assert cfg.paths.data_root == str(tmp_path)
    assert OmegaConf.to_container(cfg.paths, resolve=True)["data_root"] == str(tmp_path)


def test_data_root_defaults_to_data_without_the_environment(monkeypatch):
    monkeypatch.delenv("ONTHEFLY_DATA", raising=False)
    assert compose([]).paths.data_root == "data"


# --- every setting visible in its YAML file, one source of truth for defaults ----------------------------------
# The option files of the groups that hold settings (conf/experiment and conf/debug are presets across groups).
SETTING_GROUPS = (
    "dataset",
    "task",
    "backbone",
    "encoder",
    "fusion",
    "modulation",
    "optim",
    "scheduler",
    "trainer",
    "logger",
    "paths",
    "discrepancy",
)
# groups typed by a field of the top-level Config rather than by a schema named in their files
CONFIG_FIELD_GROUPS = ("trainer", "logger", "paths", "discrepancy")
# The dataset classes and conf/dataset/*.yaml are being reworked elsewhere; until their files name their schema
# as `- /<Class>_schema@_here_` and list every key, they are left out of the two checks that need it.
SETTING_FILES = [(g, p.stem) for g in SETTING_GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def _option_file(group: str, option: str) -> tuple[dict, list]:
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)
    return raw, raw.pop("defaults", [])


def _schema_node(group: str, defaults: list):
    """The schema an option file mirrors, as a config of its defaults; None for a preset.

    A file whose defaults list starts from another option of its group (ogm_ge.yaml: `- ogm`) is a preset: it
    sets only what differs and may override any default. Every other file mirrors a schema: the one its defaults
    list names (`- /OGM_schema@_here_`), or, for trainer / logger / paths / discrepancy, the Config field's."""
    from hydra.core.config_store import ConfigStore

    named = [_schema_named(e) for e in defaults if _schema_named(e)]
    starts_from = [e for e in defaults if isinstance(e, str) and e != "_self_" and not _schema_named(e)]
    if starts_from:
        return None
    if named:
        return ConfigStore.instance().load(f"{named[0]}.yaml").node
    assert group in CONFIG_FIELD_GROUPS, f"conf/{group} file names no schema and starts from no option"
    return ConfigStore.instance().load("config_schema.yaml").node[group]


def _placed_by_defaults(defaults: list) -> set:
    """Keys that a defaults entry fills with another option (`- /modulation@opm: opm` -> opm)."""
    return {next(iter(e)).split("@", 1)[1] for e in defaults if isinstance(e, dict) and "@" in next(iter(e))}


def test_schemas_are_not_offered_as_options():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        offered = {g: loader.get_group_options(g) for g in SETTING_GROUPS}
    assert all(offered.values())
    assert {g: [o for o in opts if "schema" in o] for g, opts in offered.items()} == {g: [] for g in offered}
    for group, schema in [
        ("modulation", "OGM_schema"),
        ("optim", "SGD_schema"),
        ("backbone", "backbone_schema"),
        ("fusion", "ConcatFusion_schema"),
        ("task", "Classification_schema"),
    ]:
        with pytest.raises(ConfigCompositionException, match=f"{group}/{schema}"):
            compose([f"{group}={schema}"])


def test_dataset_schemas_are_not_offered_as_options():
    with pytest.raises(ConfigCompositionException):
        compose(["dataset=CremaD_schema"])


@pytest.mark.slow
def test_help_lists_no_schema_as_a_choice():
    import subprocess
    import sys

    from conftest import subprocess_env

    proc = subprocess.run(
        [sys.executable, "-m", "onthefly.train", "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    lines = [line for line in groups.splitlines() if ": " in line]
    assert {line.split(":", 1)[0] for line in lines} >= {"modulation", "fusion", "optim", "trainer", "discrepancy"}
    assert [line for line in lines if "_schema" in line] == []


def _packaged_schemas(defaults: list) -> list:
    """(package, schema) of the entries that place a schema below the option's node (a mid-fusion option:
    `- /MMTM_schema@interaction`, `- /LateAverageFusion_schema@head`)."""
    return [
        (e.split("@", 1)[1], _schema_named(e))
        for e in defaults
        if _schema_named(e) and "@" in e and e.split("@", 1)[1] != "_here_"
    ]


@pytest.mark.parametrize("group,option", SETTING_FILES, ids=[f"{g}={o}" for g, o in SETTING_FILES])
def test_every_setting_is_listed_with_a_comment_in_its_yaml(group, option):
    raw, defaults = _option_file(group, option)
    packaged = _packaged_schemas(defaults)
    if packaged:  # each part lists its own schema's settings, every line of a setting with a comment
        from hydra.core.config_store import ConfigStore

        for package, name in packaged:
            settings = set(ConfigStore.instance().load(f"{name}.yaml").node) - {"_target_", "_partial_"}
            missing = settings - set(raw.get(package) or {})
            assert not missing, f"conf/{group}/{option}.yaml does not list {sorted(missing)} under {package}"
        for line in (CONF_DIR / group / f"{option}.yaml").read_text().splitlines():
            if ":" in line and not line.lstrip().startswith(("#", "-", "defaults:")):
                assert "#" in line, f"conf/{group}/{option}.yaml: {line.strip()!r} has no comment"
        return
    schema = _schema_node(group, defaults)
    if schema is None:
        return  # a preset: its keys are listed in the option it starts from
    listed = set(raw) | _placed_by_defaults(defaults)
    settings = set(schema) - {"_target_", "_partial_"}
    assert sorted(settings - listed) == [], f"conf/{group}/{option}.yaml does not list these settings"
    lines = (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in raw and not line.startswith((" ", "#")):
            assert "#" in line or (i and lines[i - 1].startswith("#")), (
                f"conf/{group}/{option}.yaml: {key} has no comment"
            )


def _drift(value, default, key: str) -> list:
    """(key, YAML value, schema default) for each key below ``key`` whose value differs from the default (a plain
    container, MISSING as "???"). Not compared: interpolations (`${backbone.width}` ties a value to another
    setting), fields without a default (MISSING: the file must set them) and free-form maps (a field whose default
    is an empty dict: backbone.encoders)."""
    if (isinstance(value, str) and "${" in value) or default == "???":
        return []
    if isinstance(value, dict) and isinstance(default, dict):
        if not default:
            return []
        return [d for k, v in value.items() if k in default for d in _drift(v, default[k], f"{key}.{k}")]
    return [] if value == default else [(key, value, default)]


@pytest.mark.parametrize("group,option", SETTING_FILES, ids=[f"{g}={o}" for g, o in SETTING_FILES])
def test_yaml_values_equal_the_schema_defaults_unless_the_file_is_a_preset(group, option):
    """One source of truth: a file that mirrors a schema (names it, see _schema_node) restates its defaults; a
    different value belongs in a preset that starts from that file (ogm_ge.yaml starts from ogm.yaml)."""
    raw, defaults = _option_file(group, option)
    schema = _schema_node(group, defaults)
    if schema is not None:
        defaults = OmegaConf.to_container(schema, enum_to_str=True)
        assert _drift(raw, defaults, group) == [], f"conf/{group}/{option}.yaml contradicts its schema's defaults"


def test_the_drift_check_can_fail():
    from onthefly.modulation.ogm import OGM

    defaults = OmegaConf.to_container(OmegaConf.structured(OGM.Config), enum_to_str=True)
    assert _drift({"ge": True, "alpha": 0.8, "end": "${x}", "scope": "auto"}, defaults, "modulation") == [
        ("modulation.ge", True, False)
    ]


# --- packaging ---------------------------------------------------------------------------------------------
def _name(requirement: str) -> str:
    name = re.split(r"[\s<>=!~\[;,]", requirement.strip(), maxsplit=1)[0]
    name = re.sub(r"[-_.]+", "-", name).lower()
    return {"pytorch": "torch"}.get(name, name)


def test_pyproject_and_environment_list_the_same_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = {_name(r) for r in project["dependencies"]}
    pip_side |= {_name(r) for r in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_side = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            conda_side |= {_name(r) for r in dep.get("pip", []) if not r.strip().startswith("-e")}
        else:
            conda_side.add(_name(dep))
    conda_side -= {"python", "pip"}
    assert "torch" in pip_side and "pytest" in pip_side
    assert conda_side == pip_side, (
        f"only in environment.yml: {sorted(conda_side - pip_side)}; only in pyproject.toml: {sorted(pip_side - conda_side)}"
    )


def test_requirement_name_normalisation():
    assert _name("pytorch>=2.4,<2.15") == "torch"
    assert _name("hydra_core >= 1.3") == "hydra-core"
    assert _name("Python=3.11") == "python"
    assert _name("ruamel.yaml[jinja2]>0.1") == "ruamel-yaml"
