"""The plugin contract: one hookspec per thing a plugin can add to mmhub.

Every hook receives a `register` callback; a plugin calls it once per component.
Built-in components use exactly these hooks, through the same `mmhub` entry-point
group as third-party packages. Results of the hooks are ignored: registration
happens through the callback, so the registry can validate each entry as it arrives.
Every hook that registers a class also takes a reference to one,
``register("package.module:Class", name="...")``: the entry is known by that name at once and its
module is imported only when the class is first used (docs/plugins.md, "Registering by reference").
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mmhub")
hookimpl = pluggy.HookimplMarker("mmhub")


@hookspec
def register_encoders(register):
    """Register modality encoders: ``register(EncoderClass)`` (media -> feature tokens)."""


@hookspec
def register_projectors(register):
    """Register input projectors: ``register(ProjectorClass)`` (features -> LLM embedding space)."""


@hookspec
def register_backbones(register):
    """Register LLM backbones: ``register(BackboneClass)`` (embeddings -> logits, generation)."""


@hookspec
def register_injectors(register):
    """Register backbone injectors: ``register(InjectorClass)`` (hooks inside the LM's layers, e.g. gated x-attn)."""


@hookspec
def register_output_projectors(register):
    """Register output projectors: ``register(OutputProjectorClass)`` (signal-token states -> conditioning)."""


@hookspec
def register_generators(register):
    """Register modality generators: ``register(GeneratorClass)`` (conditioning -> media)."""


@hookspec
def register_weight_sources(register):
    """Register weight-source schemes: ``register(scheme, resolver)``; resolver(rest_of_uri) -> Path."""


@hookspec
def register_presets(register):
    """Register shipped specs: ``register(name, size, spec_dict, io=..., description=..., missing=...)``."""


@hookspec
def register_datasets(register):
    """Register dataset formats: ``register(DatasetClass)`` (a `mmhub.data.Dataset` subclass; records -> `Sample`s)."""


@hookspec
def register_eval_tasks(register):
    """Register evaluation tasks: ``register(EvalTaskClass)`` (an `mmhub.evaluation.EvalTask`; model -> scores)."""


@hookspec
def register_importers(register):
    """Register checkpoint importers: ``register(ImporterClass)`` (an `mmhub.importers.Importer`; a transformers
    ``model_type`` family -> an mmhub spec plus its weight map)."""


@hookspec
def register_merge_methods(register):
    """Register weight-merge methods: ``register(MergeMethodClass)`` (a `mmhub.merge.methods.MergeMethod`; the
    tensors of several models -> one, used per slot by ``mmhub merge``)."""
