"""Checks a run makes before it writes anything, and all that ``--dry-run`` can resolve
without weights: the world can serve every task, the reference measures the model's world
with the model's tokenizer, and every stage resolves against the model's structure (a model
built from its config on the meta device: shapes, no memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowpress.core.errors import KnowpressError, error_summary

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from knowpress.core.specs import ModelSpec
    from knowpress.pipeline.recipe import Recipe
    from knowpress.pipeline.sources import Source


def run_world(recipe: Recipe, folders: list[Path | None]) -> Any:
    """The world a run measures: ``evaluate.world``, else a spec's preset, else the world
    file of a source folder (a knowpress teacher or stage folder); with ``evaluate.text``
    that world's held-out text is the user's, and without a fact world the text alone is the
    world when no task asks for facts (``evaluate/text.py``)."""
    from knowpress.evaluate.tasks import TASKS
    from knowpress.evaluate.text import TextWorld, WithText, load_texts

    text = TextWorld(*load_texts(recipe.evaluate.text)) if recipe.evaluate.text else None
    world = _fact_world(recipe, folders)
    if world is not None:
        return world if text is None else WithText(world, text)
    facts = [t for t in recipe.evaluate.tasks if TASKS.get(t).needs_facts]
    if text is not None and not facts:
        return text
    if facts:
        raise KnowpressError(
            f"evaluate.world: {facts[0]} asks a fact world's questions and the model is not a "
            f"knowpress fact-world teacher; name the world (e.g. evaluate.world: "
            f"bios-dense-tiny) or score your own text: evaluate: {{tasks: [kl], text: "
            f"{{path: notes.txt}}}}"
        )
    raise KnowpressError(
        "evaluate.text: the model is not a fact-world teacher, so give the held-out text to "
        "score it on (evaluate.text: {path: notes.txt}) or a world (evaluate.world)"
    )


def _fact_world(recipe: Recipe, folders: list[Path | None]) -> Any:
    from knowpress.worlds import load_world
    from knowpress.worlds.store import WORLD_FILE

    if recipe.evaluate.world is not None:
        return load_world(recipe.evaluate.world)
    for spec in (recipe.model, recipe.reference, recipe.teacher):
        if spec is not None and spec.world is not None:
            return load_world(spec.world)
    for folder in folders:
        if folder is not None and (folder / WORLD_FILE).is_file():
            return load_world(folder)
    return None


_PATH_FIELDS = ("path", "include_path")
_WORLD_FIELDS = ("model", "reference", "teacher", "evaluate")


def run_inputs(recipe: Recipe) -> dict[str, Path]:
    """Local files and folders a run reads or caches into (field -> path): every ``path``
    and ``include_path`` in the recipe that exists here (sources, text, calibration, a
    stage's own models and teacher cache, harness tasks), a folder ``evaluate.world``
    names, and the cached teachers of the world presets it uses."""
    from knowpress.worlds import PRESETS
    from knowpress.worlds.store import teacher_dir

    found: dict[str, Path] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in _PATH_FIELDS and isinstance(value, str):
                    found[here] = Path(value).expanduser()
                elif key == "world" and where in _WORLD_FIELDS and isinstance(value, str):
                    is_preset = value in PRESETS and not Path(value).exists()
                    found[here] = teacher_dir(value) if is_preset else Path(value).expanduser()
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}.{index}")

    walk(recipe.model_dump(mode="json"), "")
    return {field: path for field, path in found.items() if path.exists()}


def check_tasks(world: Any, tasks: list[str]) -> None:
    """Every task can score ``world`` (e.g. ``two_hop`` needs company facts)."""
    from knowpress.evaluate.tasks import TASKS
    from knowpress.evaluate.text import has_facts

    for name in tasks:
        task = TASKS.get(name)()
        if task.needs_facts and not has_facts(world):
            raise KnowpressError(
                f"evaluate.tasks: {name} asks a fact world's questions, but this run measures "
                f"only evaluate.text; add evaluate.world or keep to kl and perplexity"
            )
        problem = task.unsupported(world)
        if problem:
            raise KnowpressError(
                f"evaluate.tasks: {name} cannot be scored on this world: {problem}; remove it "
                f"from evaluate.tasks or choose another evaluate.world"
            )


def world_key_of(source: Source) -> str | None:
    """The world a knowpress teacher (or a stage folder made from one) was trained on."""
    from knowpress.worlds.store import WORLD_FILE, teacher_info

    folder = source.local_dir
    if folder is None or not (folder / WORLD_FILE).is_file():
        return None
    return teacher_info(folder).get("world_key")


def check_folders(named: dict[str, Source]) -> None:
    """Every local source folder holds a loadable model (config, intact safetensors,
    tokenizer), so a broken one is found before the run writes anything."""
    from knowpress.formats.io import check_local

    for field, source in named.items():
        folder = source.local_dir
        if folder is not None:
            try:
                check_local(folder, source.location)
            except KnowpressError as exc:
                raise KnowpressError(f"{field}: {exc}") from None
            check_artifact(folder, field)


def check_artifact(folder: Path, field: str) -> None:
    """A stage folder is read only while its payload is what its manifest recorded (sizes and
    sha256): scores of other bytes would not measure what the stage stored."""
    from knowpress.formats.manifest import changed_files, read_manifest

    manifest = read_manifest(folder) if folder.is_dir() else None
    problems = changed_files(folder, manifest) if manifest is not None else []
    if problems:
        raise KnowpressError(
            f"{field}: {folder}: {problems[0]}; its scores would not measure the stored "
            f"artifact, so re-run the stage that wrote it"
        )


def check_sources(named: dict[str, Source], world: Any) -> None:
    """Every fact-world source measures ``world``; the reference shares the model's vocabulary."""
    from knowpress.evaluate.text import has_facts

    key = world.config.key()
    for field, source in named.items():
        if not has_facts(world):
            break
        trained = world_key_of(source)
        if trained is not None and trained != key:
            raise KnowpressError(
                f"{field}: {source.location} knows world {trained}, but this run measures world "
                f"{key}; score a fact-world teacher on its own world (drop evaluate.world)"
            )
    why = "retention must compare the same token space"
    same_vocabulary("reference", named["model"], named["reference"], why)


def same_vocabulary(field: str, model: Source, other: Source, why: str) -> None:
    """``other``'s tokenizer is the model's (skipped when either cannot be read offline)."""
    if model.location == other.location:
        return
    ours, theirs = _vocabulary(model), _vocabulary(other)
    if ours is not None and theirs is not None and ours != theirs:
        raise KnowpressError(
            f"{field}: its tokenizer is not the model's ({len(theirs):,} vs {len(ours):,} "
            f"tokens, {len(set(ours.items()) ^ set(theirs.items())):,} differ); {why}: give "
            f"a {field.rsplit('.', 1)[-1]} with the model's tokenizer"
        )


def _vocabulary(source: Source) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    location = built_location(source)
    if location is None:  # a preset not built yet: its tokenizer is the world's
        from knowpress.worlds import PRESETS, build_tokenizer
        from knowpress.worlds.store import make_world

        preset = PRESETS.get(str(source.spec.world))
        return dict(build_tokenizer(make_world(preset.world)).get_vocab())
    trust = source.spec.trust_remote_code
    once = Path(location).is_dir() or _offline_only()
    for local in (True,) if once else (True, False):
        try:  # a hub id: the cached tokenizer, else the hub's (when it can be reached)
            tokenizer = AutoTokenizer.from_pretrained(
                location, trust_remote_code=trust, local_files_only=local
            )
        except (OSError, ValueError):
            continue
        return dict(tokenizer.get_vocab())
    return None


def built_location(source: Source) -> str | None:
    """Where ``source`` can be read now: its location, or for a world preset resolved
    without building (``--dry-run``) the cached teacher, None when not built yet."""
    if source.spec.world is None or not source.location.startswith("<world:"):
        return source.location
    from knowpress.worlds.store import is_complete, teacher_dir

    built = teacher_dir(source.spec.world)
    return str(built) if is_complete(built) else None


def check_inputs(recipe: Recipe, named: dict[str, Source], world: Any) -> list[str]:
    """Before the first write and in ``--dry-run``: the sources against the world and the
    model's vocabulary (``check_sources``); for stages that need a teacher, its vocabulary
    and structure (``StageConfig.check_teacher``: e.g. ``moe_teacher`` on a dense teacher);
    every model a stage loads itself (``StageConfig.sources``: Delta-KD's bases); the
    ``lm_eval`` tasks against the harness's index. Returns notes for the plan."""
    from knowpress.pipeline.sources import resolve_source

    check_sources({"model": named["model"], "reference": named["reference"]}, world)
    model = named["model"]
    teaching = [(i, s) for i, s in enumerate(recipe.stages) if type(s).needs_teacher]
    if teaching:
        teacher = named["teacher"]
        same_vocabulary("teacher", model, teacher, "distillation compares next-token "
                        "distributions")  # fmt: skip
        structure = structure_model(recipe.model, built_location(model))
        taught = structure_model(teacher.spec, built_location(teacher))
        for index, config in teaching:
            if structure is not None and taught is not None:
                _prefixed(index, config, lambda c=config: c.check_teacher(structure, taught))
    for index, config in enumerate(recipe.stages):
        for field, spec in config.sources().items():
            where = f"stages.{index}.{field}"
            source = resolve_source(spec, build=False, field=f"{where}.path")
            check_folders({where: source})
            same_vocabulary(where, model, source, "its logits are combined with the model's")
    if recipe.evaluate.lm_eval is not None:
        from knowpress.evaluate.lm_eval_bridge import check_harness_tasks

        note = check_harness_tasks(recipe.evaluate.lm_eval)
        return [note] if note else []
    return []


def _prefixed(index: int, config: Any, check: Any) -> None:
    try:
        check()
    except KnowpressError as exc:
        raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None


def _offline_only() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def structure_model(spec: ModelSpec, location: str | None) -> PreTrainedModel | None:
    """The model at ``location`` (or the preset's, unbuilt) on the meta device; None when its
    config cannot be had offline (a hub id not in the local cache)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from knowpress.formats import detect
    from knowpress.formats.ct_modules import ct_skeleton
    from knowpress.formats.knowpress_packed import packed_skeleton

    trust = spec.trust_remote_code
    folder = Path(location) if location and Path(location).is_dir() else None
    if folder is not None:
        try:
            with torch.device("meta"):
                found = detect(folder)[0].name
                if found == "hf-packed":
                    return packed_skeleton(folder, torch.float32, trust)
                if found == "hf-compressed-tensors":  # its packed modules, for qad's check
                    return ct_skeleton(folder, trust)
                config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        except KnowpressError:
            raise
        except Exception as exc:  # transformers' checks of the config's values
            raise KnowpressError(
                f"{folder / 'config.json'}: transformers cannot build the model it describes "
                f"({error_summary(exc)}); fix the config"
            ) from None
    with torch.device("meta"):
        if spec.world is not None:
            return _preset_model(spec.world)
        try:
            config = AutoConfig.from_pretrained(
                spec.path, trust_remote_code=trust, local_files_only=True
            )
        except (OSError, ValueError):
            return None
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


def _preset_model(name: str) -> PreTrainedModel:
    from knowpress.teachers.training import make_model
    from knowpress.worlds import PRESETS, build_tokenizer
    from knowpress.worlds.store import make_world

    preset = PRESETS.get(name)
    max_positions = int(preset.model.get("max_position_embeddings", 2048))
    tokenizer = build_tokenizer(make_world(preset.world), model_max_length=max_positions)
    return make_model(preset, tokenizer)


def dry_run(recipe: Recipe) -> tuple[Any, list[list[str]] | None, list[str]]:
    """What ``--dry-run`` resolves without weights or training: the sources (folders,
    vocabularies, the teacher's structure), the world, the tasks on it, and each stage
    against the model's structure (None when the structure is not at hand); plus notes."""
    from knowpress.pipeline.sources import resolve_source

    specs = {"model": recipe.model, "reference": recipe.reference, "teacher": recipe.teacher}
    sources = {
        name: resolve_source(spec, build=False, field=f"{name}.path")
        for name, spec in specs.items()
        if spec is not None
    }
    sources.setdefault("reference", sources["model"])
    sources.setdefault("teacher", sources["reference"])
    check_folders(sources)
    world = run_world(recipe, [source.local_dir for source in sources.values()])
    check_tasks(world, recipe.evaluate.tasks)
    notes = check_inputs(recipe, sources, world)
    location = built_location(sources["model"])
    model = structure_model(recipe.model, location)
    plan = None if model is None else check_stages(recipe, model, attached_policies(location))
    return world, plan, notes


def attached_policies(location: str | None) -> dict[str, Any]:
    """The runtime policies a model folder's manifest attaches (a stage folder as input)."""
    from knowpress.formats.manifest import MANIFEST_FILE, read_manifest
    from knowpress.runtimes.loader import expert_skip_of, kv_policy_of

    folder = Path(location) if location and Path(location).is_dir() else None
    manifest = read_manifest(folder) if folder is not None else None
    if manifest is None:
        return {}
    where = str(folder / MANIFEST_FILE)
    found = {
        "kv_policy": kv_policy_of(manifest, where),
        "expert_skip": expert_skip_of(manifest, where),
    }
    return {slot: policy for slot, policy in found.items() if policy is not None}


def check_stages(recipe: Recipe, model: PreTrainedModel | None,
                 attached: dict[str, Any] | None = None) -> list[list[str]]:  # fmt: skip
    """Each stage's ``check`` against the model's structure and its ``check_runtime``
    against the policies attached before it (``attached``: the input's); plan lines."""
    if model is None:
        return [[] for _ in recipe.stages]
    facts = []
    packed_by = uneven_by = None
    attached = dict(attached or {})
    for index, config in enumerate(recipe.stages):
        if index and type(recipe.stages[index - 1]).final:
            raise KnowpressError(
                f"stages.{index} ({config.kind}) follows stages.{index - 1} "
                f"({recipe.stages[index - 1].kind}), whose artifact no stage can load: "
                f"put the {recipe.stages[index - 1].kind} stage last"
            )
        if type(config).trains_weights and packed_by is not None:
            raise KnowpressError(
                f"stages.{index} ({config.kind}): changes float weights, and stages.{packed_by} "
                f"packs them first: put the {config.kind} stage before "
                f"{recipe.stages[packed_by].kind}"
            )
        if type(config).packs_weights and uneven_by is not None:
            raise KnowpressError(
                f"stages.{index} ({config.kind}): stages.{uneven_by} leaves uneven expert "
                f"counts, which packed weights cannot be loaded with yet; use budget: per_layer"
            )
        if type(config).packs_weights and packed_by is None:
            packed_by = index
        if config.uneven_structure():
            uneven_by = index
        try:
            config.check_runtime(attached, model)
            facts.append(config.check(model, recipe.model.dtype))
            model = config.structure_after(model)
            attached |= config.attaches()
        except KnowpressError as exc:
            raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None
    return facts
