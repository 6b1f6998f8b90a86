"""Checks a run makes before it writes anything, and all that ``--dry-run`` can resolve
without weights: the world can serve every task, the reference measures the model's world
with the model's tokenizer, and every stage resolves against the model's structure (a model
built from its config on the meta device: shapes, no memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowpress.errors import KnowpressError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from knowpress.recipe import ModelSpec, Recipe
    from knowpress.sources import Source


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
    from knowpress.world import load_world
    from knowpress.world.teacher import WORLD_FILE

    if recipe.evaluate.world is not None:
        return load_world(recipe.evaluate.world)
    for spec in (recipe.model, recipe.reference, recipe.teacher):
        if spec is not None and spec.world is not None:
            return load_world(spec.world)
    for folder in folders:
        if folder is not None and (folder / WORLD_FILE).is_file():
            return load_world(folder)
    return None


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
    from knowpress.world.teacher import WORLD_FILE, teacher_info

    folder = source.local_dir
    if folder is None or not (folder / WORLD_FILE).is_file():
        return None
    return teacher_info(folder).get("world_key")


def check_folders(named: dict[str, Source]) -> None:
    """Every local source folder holds a loadable model (config, intact safetensors,
    tokenizer), so a broken one is found before the run writes anything."""
    from knowpress.models.io import check_local

    for field, source in named.items():
        folder = source.local_dir
        if folder is not None:
            try:
                check_local(folder, source.location)
            except KnowpressError as exc:
                raise KnowpressError(f"{field}: {exc}") from None


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
    model, reference = named["model"], named["reference"]
    if model.location != reference.location:
        ours, theirs = _vocabulary(model), _vocabulary(reference)
        if ours != theirs:
            raise KnowpressError(
                f"reference: its tokenizer is not the model's ({len(theirs):,} vs {len(ours):,} "
                f"tokens, {len(set(ours.items()) ^ set(theirs.items())):,} differ); retention "
                f"must compare the same token space: give a reference with the model's tokenizer"
            )


def _vocabulary(source: Source) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source.location, trust_remote_code=source.spec.trust_remote_code
    )
    return dict(tokenizer.get_vocab())


def structure_model(spec: ModelSpec, location: str | None) -> PreTrainedModel | None:
    """The model at ``location`` (or the preset's, unbuilt) on the meta device; None when its
    config cannot be had offline (a hub id not in the local cache)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from knowpress.models.io import QUANT_FILE
    from knowpress.models.packed import packed_skeleton

    trust = spec.trust_remote_code
    folder = Path(location) if location and Path(location).is_dir() else None
    with torch.device("meta"):
        if folder is not None and (folder / QUANT_FILE).is_file():
            return packed_skeleton(folder, torch.float32, trust)
        if folder is not None:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        elif spec.world is not None:
            return _preset_model(spec.world)
        else:
            try:
                config = AutoConfig.from_pretrained(
                    spec.path, trust_remote_code=trust, local_files_only=True
                )
            except (OSError, ValueError):
                return None
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


def _preset_model(name: str) -> PreTrainedModel:
    from knowpress.world import PRESETS, build_tokenizer
    from knowpress.world.teacher import make_world
    from knowpress.world.training import make_model

    preset = PRESETS.get(name)
    max_positions = int(preset.model.get("max_position_embeddings", 2048))
    tokenizer = build_tokenizer(make_world(preset.world), model_max_length=max_positions)
    return make_model(preset, tokenizer)


def dry_run(recipe: Recipe) -> tuple[Any, list[list[str]] | None]:
    """What ``--dry-run`` resolves without weights or training: the world, the tasks on it,
    and each stage against the model's structure (None when the structure is not at hand)."""
    from knowpress.sources import resolve_source
    from knowpress.world.teacher import is_complete, teacher_dir

    specs = {"model": recipe.model, "reference": recipe.reference, "teacher": recipe.teacher}
    sources = {
        name: resolve_source(spec, build=False, field=f"{name}.path")
        for name, spec in specs.items()
        if spec is not None
    }
    world = run_world(recipe, [source.local_dir for source in sources.values()])
    check_tasks(world, recipe.evaluate.tasks)
    location = sources["model"].location
    if recipe.model.world is not None:
        built = teacher_dir(recipe.model.world)
        location = str(built) if is_complete(built) else None
    model = structure_model(recipe.model, location)
    return world, None if model is None else check_stages(recipe, model)


def check_stages(recipe: Recipe, model: PreTrainedModel | None) -> list[list[str]]:
    """Each stage's ``check`` against the model's structure; per-stage plan lines."""
    if model is None:
        return [[] for _ in recipe.stages]
    facts = []
    packed_by = uneven_by = None
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
                f"packs them first: put the {config.kind} stage before quantize"
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
            facts.append(config.check(model, recipe.model.dtype))
            model = config.structure_after(model)
        except KnowpressError as exc:
            raise KnowpressError(f"stages.{index} ({config.kind}): {exc}") from None
    return facts
