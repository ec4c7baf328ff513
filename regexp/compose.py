"""From a command line to a job's config: Hydra's compose API over conf/, Hydra's errors
turned into one ConfigError line, optional groups added without `+`, sweeps expanded.

`compose_and_validate(overrides)` is the one validation path: `regexp train` (its pre-flight,
for every job of a sweep), and the Python API call it before any work. Hydra is imported only
inside functions, torch never.
"""

import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional, get_args, get_origin

from omegaconf import DictConfig, OmegaConf

from regexp.config import OPTIONAL_GROUPS, REGISTRY, ConfigError, TrainConfig, config_dir, explain, validate

# The Hydra plugins behind the launcher and sweeper presets (conf/hydra/*/*.yaml's _target_),
# and the extra of pyproject.toml that installs each
PLUGIN_EXTRAS = {
    "hydra_plugins.hydra_joblib_launcher": "launchers",
    "hydra_plugins.hydra_submitit_launcher": "launchers",
    "hydra_plugins.hydra_optuna_sweeper": "search",
}
PLUGIN_GROUPS = ("hydra/launcher", "hydra/sweeper")
# regexp's launchers built on another plugin (the module of their _target_ -> that plugin), and
# those whose schema is in Hydra's ConfigStore, not in conf/ (option -> their _target_)
SUBMITIT_JOBS = "hydra_plugins.regexp_fused_launcher._submitit_jobs"
BUILT_ON = {SUBMITIT_JOBS: "hydra_plugins.hydra_submitit_launcher",
            "hydra_plugins.regexp_fused_launcher._joblib_jobs": "hydra_plugins.hydra_joblib_launcher"}
STORED_PRESETS = {("hydra/launcher", "fused_slurm"): f"{SUBMITIT_JOBS}.FusedSlurmLauncher",
                  ("hydra/launcher", "fused_local"): f"{SUBMITIT_JOBS}.FusedLocalLauncher"}


def compose_and_validate(overrides: list[str]) -> DictConfig:
    """One job's config from `overrides`, composed as `regexp train` does, typed and
    validated. Raises ConfigError (one line naming the key) on any bad input."""
    return validate(compose(overrides))


def compose(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Hydra's composition of conf/ for one job (typed by the schemas), with Hydra's errors
    turned into ConfigError. `with_hydra` keeps Hydra's node (run and sweep dirs, sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialized():
        parsed = _parse(OverridesParser.create(), with_added_groups(overrides))
        sweep = next((o for o in parsed if o.is_sweep_override()), None)
        if sweep is not None:
            raise ConfigError(sweep.get_key_element(), sweep.get_value_string(),
                              "several values make a sweep: add -m (regexp train -m ...)")
        _require_added(parsed)
        return _hydra_compose(parsed, with_hydra)


@contextmanager
def composing_many() -> Iterator[None]:
    """While a sweep's jobs are composed one after another (the pre-flight; a launcher loading
    them on the launching host): Hydra's defaults list and the merge of the config files it
    names are made once for each set of group choices (`optimizer=adam`, `+regularizer=...`,
    `hydra/launcher=...`) and reused, instead of once a job; Hydra still applies each job's own
    values (its config overrides) and fills its Hydra node. A 256-seed sweep composes its jobs
    several times faster. Hydra 1.3's composition, step for step, with its two costly steps
    remembered: nothing else changes while the block runs."""
    import copy

    from hydra._internal import config_loader_impl as loader
    from hydra._internal.defaults_list import DefaultsList, Overrides

    lists: dict[tuple, DefaultsList] = {}
    merged: dict[int, DictConfig] = {}
    make_list, merge = loader.create_defaults_list, loader.ConfigLoaderImpl._compose_config_from_defaults_list

    def defaults_list(repo: Any, config_name: Optional[str], overrides_list: list, prepend_hydra: bool,
                      skip_missing: bool) -> DefaultsList:
        job = Overrides(repo=repo, overrides_list=overrides_list)  # which overrides choose groups, which set values
        key = (config_name, prepend_hydra, skip_missing,
               tuple(o.input_line for o in overrides_list if o not in job.config_overrides))
        if key not in lists:
            lists[key] = make_list(repo, config_name, overrides_list, prepend_hydra, skip_missing)
        made = lists[key]
        return DefaultsList(defaults=made.defaults, config_overrides=job.config_overrides,
                            defaults_tree=made.defaults_tree, overrides=made.overrides)

    def merged_config(self: Any, defaults: list, repo: Any) -> DictConfig:
        if id(defaults) not in merged:
            merged[id(defaults)] = merge(self, defaults, repo)
        return copy.deepcopy(merged[id(defaults)])  # each job's to change

    loader.create_defaults_list, loader.ConfigLoaderImpl._compose_config_from_defaults_list = defaults_list, merged_config
    try:
        yield
    finally:
        loader.create_defaults_list, loader.ConfigLoaderImpl._compose_config_from_defaults_list = make_list, merge


_HYDRA_IN_USE = threading.RLock()  # held by the thread inside initialized(); re-entered by its nested calls


@contextmanager
def initialized() -> Iterator[None]:
    """Hydra's compose API pointed at conf/ (nested calls reuse the outer initialization).
    Hydra's state is one per process: a thread composes only while no other one does, so
    `regexp.run` in two threads works."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with _HYDRA_IN_USE:
        if GlobalHydra.instance().is_initialized():
            yield
            return
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
            yield



def _parse(parser: Any, overrides: list[str]) -> list:
    from hydra.errors import HydraException

    try:
        return parser.parse_overrides(overrides)
    except HydraException as e:  # a syntax error: named by the first override that fails alone
        bad = next((o for o in overrides if _fails_to_parse(parser, o)), None)
        if bad is None:
            raise ConfigError("overrides", " ".join(overrides), _first_line(e)) from None
        raise ConfigError("override", bad, _first_line(e)) from None
    except ValueError:  # Python's int() reads at most sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits()
        if not any(re.search(rf"\d{{{limit + 1},}}", o) for o in overrides):
            raise
        shown = " ".join(o if len(o) <= 80 else f"{o[:60]}...({len(o)} characters)" for o in overrides)
        raise ConfigError("overrides", shown, f"a number of more than {limit} digits; no setting takes one") from None


def _fails_to_parse(parser: Any, override: str) -> bool:
    from hydra.errors import HydraException

    try:
        parser.parse_overrides([override])
    except HydraException:
        return True
    return False


def _hydra_compose(parsed: list, with_hydra: bool) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    _require_plugins(parsed)
    try:
        return hydra_compose(config_name="train", overrides=[o.input_line for o in parsed], return_hydra_config=with_hydra)
    except MissingConfigException as e:
        raise _unknown_option(e, parsed) from None
    except ConfigCompositionException as e:
        cause = e.__cause__ or e.__context__  # Hydra chains OmegaConf's error one way or the other
        if isinstance(cause, OmegaConfBaseException):
            raise _bad_value(cause, parsed) from None
        raise ConfigError("overrides", " ".join(o.input_line for o in parsed), _first_line(e)) from None
    except HydraException as e:
        raise ConfigError("overrides", " ".join(o.input_line for o in parsed), _first_line(e)) from None


def _require_plugins(parsed: list) -> None:
    """`hydra/launcher=X` or `hydra/sweeper=X` whose preset needs a plugin that is not
    installed: one line naming the extra that installs it (Hydra would fail later, with a
    traceback once the sweep dir is made, or "Could not load 'hydra/sweeper/optuna'")."""
    import importlib.util

    for o in parsed:
        if o.key_or_group not in PLUGIN_GROUPS or not isinstance(o.value(), str):
            continue
        plugin = _preset_plugin(o.key_or_group, o.value())
        try:
            found = plugin is None or importlib.util.find_spec(plugin) is not None
        except ImportError:  # a parent package that cannot be imported either
            found = False
        if not found:
            extra = PLUGIN_EXTRAS.get(plugin)
            install = f"pip install 'regexp[{extra}]'" if extra else f"install the package that provides {plugin}"
            raise ConfigError(o.key_or_group, o.value(), f"needs the Hydra plugin {plugin}, which is not installed; {install}")


@lru_cache(maxsize=None)
def _preset_plugin(group: str, option: str) -> Optional[str]:
    """The plugin package (`hydra_plugins.NAME`) that a preset of conf/<group>/ names as its
    _target_; None for an option that is no file there (Hydra's own, or unknown: composing says so)."""
    from pathlib import Path

    path = Path(config_dir()) / group / f"{option}.yaml"
    target = str(OmegaConf.load(path).get("_target_") or "") if path.is_file() else STORED_PRESETS.get((group, option), "")
    module = target.rpartition(".")[0]
    return BUILT_ON.get(module) or (".".join(target.split(".")[:2]) if target.startswith("hydra_plugins.") else None)


def _unknown_option(e: Any, parsed: list) -> ConfigError:
    """`group=option` whose option is no file: name the group's options."""
    group, _, option = (e.missing_cfg_file or "").rpartition("/")
    if not group or not e.options:
        return ConfigError("config", e.missing_cfg_file, _first_line(e))
    override = next((o for o in parsed if o.key_or_group == group), None)
    key = override.get_key_element() if override is not None else group
    options = REGISTRY[group] if group in REGISTRY else e.options
    return ConfigError(key, option, "unknown option; choose one of " + ", ".join(sorted(options)))


def _bad_value(cause: Any, parsed: list) -> ConfigError:
    """An override (or a preset's value) that OmegaConf refused while merging it into its schema."""
    full_key = str(cause.full_key or "")
    if cause.object_type is list:  # an element of a list: report the list
        full_key = full_key.rpartition("[")[0]
    override = next((o for o in parsed if f"{o.key_or_group}.".startswith(f"{full_key}.")), None)
    if override is not None and override.is_delete():  # `~key` of a typed node: no value to show
        return ConfigError(full_key, "(deleted)", "cannot be deleted, its schema requires a value; set one instead")
    value = override.get_value_string() if override is not None else "(in a preset)" if cause.value is None else cause.value
    return explain(cause, full_key, value)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _holds(composed: DictConfig, group: str) -> bool:
    """Whether the composed defaults hold `group` (a list of options is missing from Hydra's
    choices, so look at what they filled too)."""
    node = OmegaConf.select(composed, group, default=None)
    return group in composed.hydra.runtime.choices or any(v is not None for v in (node or {}).values())


def _require_added(parsed: list) -> None:
    """`regularizer.dropout.p=0.3` sets a key of an option that must be added first: say how
    (OmegaConf would fail on the empty node with an assertion, not a message)."""
    for o in parsed:
        if _option_key(o) is None or o.is_add() or o.is_force_add():  # `+`/`++` add the option with the key
            continue
        group, option = _option_key(o)
        added = [p.value() for p in parsed if p.key_or_group == group and not p.is_delete()]
        if any(option == v or (isinstance(v, list) and option in v) for v in added):
            continue
        others = [p for p in parsed if _option_key(p) is None]
        if OmegaConf.select(_hydra_compose(others, False), f"{group}.{option}") is None:  # a preset may add it
            raise ConfigError(o.get_key_element(), o.get_value_string(),
                              f"{group} {option} is not added; add it with +{group}={option} (then set {o.key_or_group})")


def with_added_groups(overrides: list[str]) -> list[str]:
    """`group=option` for an optional group that the composed defaults do not hold yet means
    `+group=option` (W&B sweep agents cannot pass parameters that start with `+`). A group
    that a preset already added (`+experiment=X regularizer=l2`) keeps Hydra's meaning: replace."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    parsed = _parse(parser, overrides)
    undecided = {i for i, o in enumerate(parsed)
                 if o.type == OverrideType.CHANGE and o.package is None and o.key_or_group in OPTIONAL_GROUPS}
    lines = [o.input_line for o in parsed]
    with initialized():
        for group in OPTIONAL_GROUPS:  # in order: a preset may add the later groups
            mine = {i for i in undecided if parsed[i].key_or_group == group}
            if not mine:
                continue
            # what the rest composes to; keys inside an optional group wait for their option
            known = [line for i, line in enumerate(lines) if i not in undecided and not parsed[i].is_sweep_override()
                     and _option_key(parsed[i]) is None]
            if not _holds(_hydra_compose(_parse(parser, known), True), group):
                lines = [f"+{line}" if i in mine else line for i, line in enumerate(lines)]
            undecided -= mine
    return [f"++{line}" if _sets_free_mapping(o) else line for o, line in zip(parsed, lines)]


FREE_MAPPINGS = ("model.kwargs",)  # schema fields typed Dict[str, Any]: whatever keys the user's model takes


def _sets_free_mapping(o: Any) -> bool:
    """`model.kwargs={...}` or `model.kwargs.k=v`: Hydra's struct mode refuses new keys in a
    typed mapping, so they are read as `++` (set or add)."""
    from hydra.core.override_parser.types import OverrideType

    key = o.key_or_group
    return o.type == OverrideType.CHANGE and o.package is None and any(
        key == m or key.startswith(m + ".") for m in FREE_MAPPINGS)


def _option_key(o: Any) -> Optional[tuple[str, str]]:
    """(group, option) when the override sets a key of an optional group's option
    (`regularizer.dropout.p`), else None."""
    group, _, rest = o.key_or_group.partition(".")
    option = rest.partition(".")[0]
    return (group, option) if group in OPTIONAL_GROUPS and option in REGISTRY.get(group, {}) else None


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a basic-sweeper multirun: the config's own sweep
    (`hydra.sweeper.params`, as presets carry) and then the command line's, expanded as
    Hydra's BasicSweeper does (a later key replaces an earlier one in place). A search
    sweeper (Optuna) draws its jobs as it goes: then only the fixed part, one job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = _parse(parser, with_added_groups(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed, with_hydra=True)
    if not expands_its_jobs(base.hydra):
        return [fixed]
    params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
    axes: dict[str, list[str]] = {}
    for o in _parse(parser, params) + parsed:
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ConfigError(key, o.get_value_string(), "only a search sweeper (hydra/sweeper=tune) expands interval sweeps")
        values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes[key] = [f"{key}={v}" for v in values]
    jobs: list[list[str]] = [[]]
    for choices in axes.values():
        jobs = [job + [c] for job in jobs for c in choices]
    return jobs


def expands_its_jobs(hydra_cfg: Any) -> bool:
    """Whether the sweeper is Hydra's basic one, whose jobs sweep_jobs lists in advance."""
    return str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper")


def refuse_sweep(overrides: list[str], why: str) -> None:
    """`key=a,b` (or range(), glob()) to a command that takes one config: ConfigError naming
    the key, `why` its reason. Syntax errors are left to compose's line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return
    sweep = next((o for o in parsed if o.is_sweep_override()), None)
    if sweep is not None:
        raise ConfigError(sweep.get_key_element(), sweep.get_value_string(), why)


def with_resumed_run(args: list[str]) -> list[str]:
    """`resume=RUN_DIR`: the run's own overrides, then the user's, into the same run dir.
    A run dir may come from anyone (a shared folder, an archive): only config keys and group
    choices are taken from it (trusted_overrides)."""
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from regexp.rundir import read_overrides

    line = next((a for a in args if a.startswith("resume=")), None)
    value = None if line is None else _parse(OverridesParser.create(), [line])[0].value()  # quotes removed
    if value in (None, "auto"):
        return args
    run_dir = Path(str(value))
    recorded = read_overrides(run_dir)
    if not (run_dir / "checkpoint.pt").is_file() or recorded is None:
        raise ConfigError("resume", value, "must be a run directory holding checkpoint.pt and .hydra/overrides.yaml")
    saved = trusted_overrides([o for o in recorded if not o.startswith("resume=")], run_dir / ".hydra" / "overrides.yaml")
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if is_override(a)}
    kept = [o for o in without_imports(saved, keys, run_dir) if o.split("=", 1)[0].lstrip("+~") not in keys]  # the user's value wins
    return [*kept, *args, f"hydra.run.dir={hydra_quoted(str(run_dir.resolve()))}"]


IMPORTED_KEYS = ("model.target",)  # keys whose value names code to import (regexp.custom)


def without_imports(saved: list[str], keys: set[str], run_dir: Any) -> list[str]:
    """A run dir's overrides without those naming code to import: a resume never imports what
    only its run dir names (it may come from anyone). The user names it again on the command
    line (`keys`), else ConfigError naming the key."""
    named = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in saved if "=" in o}
    for key in IMPORTED_KEYS:
        if key in named and key not in keys:
            raise ConfigError(key, "(not given)", f"the run in {run_dir} was trained with {key}={named[key]}; a resume "
                              f"never imports code named only in its run dir: name it again ({key}=...)")
    return [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in IMPORTED_KEYS]


def hydra_quoted(text: str) -> str:
    """`text` as one literal value of Hydra's override grammar, whatever its characters (spaces,
    non-ASCII, quotes, `${`): single-quoted, with the backslashes that precede a quote or end
    the text doubled, as the grammar asks, and each `${` escaped (its backslashes doubled), so
    that OmegaConf takes it as text: a value resolved once is never resolved again."""
    import re

    text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m[1] * 2, text) + "'"


def trusted_overrides(lines: list[str], path: Any) -> list[str]:
    """`lines` read from a run dir's `path`, if each one only sets a key of the schemas
    (TrainConfig, the options' schemas of config.REGISTRY) or chooses a group's option
    (`+experiment=` a shipped preset). Anything else (hydra.*, any _target_, a deletion, a key
    or option the schemas do not have) could make Hydra call or write what the file says:
    ConfigError naming the file and the key, before anything is composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException:  # Hydra's grammar refuses it: no override regexp wrote
            raise UntrustedOverride(path, line) from None
        if "_target_" in line or override.is_delete() or override.package is not None or not (
                _is_group_choice(override) or _in_schema(override.key_or_group.split("."))):
            raise UntrustedOverride(path, line)
    return lines


class UntrustedOverride(ConfigError):
    """A line of a run dir's overrides.yaml that a resume does not take: `file: line: why`."""

    def __init__(self, path: Any, line: str):
        super().__init__("resume", line, "a resumed run takes only config keys and group choices from its run dir")
        self.args = (f"{path}: {line if line.isprintable() else repr(line)}: {self.allowed}",)


def _is_group_choice(override: Any) -> bool:
    """`group=option` with an option of config.REGISTRY, `+regularizer=[a,b]`, `+experiment=` a preset."""
    group = override.key_or_group
    value = override.value()
    choices = value if isinstance(value, list) and group == "regularizer" else [value]
    if group == "experiment":
        return isinstance(value, str) and value in experiment_presets()
    return group in REGISTRY and all(isinstance(c, str) and c in REGISTRY[group] for c in choices)


def experiment_presets() -> list[str]:
    """The `+experiment=` presets shipped in conf/experiment."""
    from pathlib import Path

    return [p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml")]


def _in_schema(path: list[str]) -> bool:
    """Whether a dotted key names a field of the schemas: TrainConfig's, any option's of a
    group (the composed config then checks it against the chosen one), regularizer.<option>.*."""
    head, rest = path[0], path[1:]
    if head in REGISTRY and not rest:  # the group itself: only a choice (_is_group_choice)
        return False
    if head == "regularizer":
        return rest[0] in REGISTRY[head] and _fields_have(REGISTRY[head][rest[0]].schema, rest[1:])
    if head in REGISTRY:
        return any(_fields_have(option.schema, rest) for option in REGISTRY[head].values())
    return _fields_have(TrainConfig, path)


def _fields_have(schema: type, path: list[str]) -> bool:
    """Whether `path` walks the fields of dataclass `schema` (Optional[...] unwrapped)."""
    if not path:
        return True
    declared = {f.name: f.type for f in fields(schema)} if is_dataclass(schema) else {}
    if path[0] not in declared:
        return False
    if get_origin(declared[path[0]]) is dict:  # a free mapping (model.kwargs): any key of it
        return True
    inner = next((t for t in (declared[path[0]], *get_args(declared[path[0]])) if is_dataclass(t)), None)
    return len(path) == 1 or (inner is not None and _fields_have(inner, path[1:]))


def task_overrides(hydra_cfg: Any) -> list[str]:
    """A job's override lines as given (hydra.overrides.task), never resolved: Hydra keeps them
    as config strings, so reading them plainly would resolve a `${oc.env:NAME}` in them."""
    return OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)


def run_name(hydra_cfg: Any) -> str:
    """Hydra's override_dirname (the W&B run's name), made of the override lines as given."""
    return OmegaConf.to_container(hydra_cfg.job, resolve=False)["override_dirname"]


def is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def check_job(cfg: DictConfig, data: bool = True) -> DictConfig:
    """The pre-flight of one composed job: its validated config, the device it asks for, a
    custom model (imported, built, tried: regexp.custom) and, with `data`, its data set (found
    or downloaded). ConfigError / RunError, one line."""
    from regexp.config import resolve_device, user_built

    typed = validate(cfg)
    resolve_device(typed)
    if user_built(typed.model):
        from regexp.custom import inspect  # torch: only for a model of the user's own

        inspect(typed)
    if data:
        from regexp.data import check_available  # torch: only once the config is known good

        check_available(typed.dataset)
    return typed
