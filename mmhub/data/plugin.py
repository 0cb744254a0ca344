"""The built-in dataset formats, registered through the same hook as any plugin's.

Each is registered by reference (``module:Class``) under its name; a format's module loads when it is used.
"""

from __future__ import annotations

from mmhub.hookspecs import hookimpl

DATASETS = (
    ("llava_json", "mmhub.data.llava_json:LlavaJsonDataset"),
    ("sharegpt", "mmhub.data.sharegpt:ShareGPTDataset"),
    ("captions", "mmhub.data.captions:CaptionsDataset"),
    ("preference", "mmhub.data.preference:PreferenceDataset"),
    ("webdataset", "mmhub.data.webdataset:WebDataset"),
    ("easy_vqa", "mmhub.data.easy_vqa:EasyVQADataset"),
    ("nlf", "mmhub.data.nlf:NLFDataset"),
    ("easy_vqa_varied", "mmhub.data.easy_vqa_varied:EasyVQAVariedDataset"),
    # a model's own replies to a dataset's prompts (it loads a model, so it lives with training)
    ("replay", "mmhub.train.replay:ReplayDataset"),
)


@hookimpl
def register_datasets(register):
    for name, ref in DATASETS:
        register(ref, name=name)
