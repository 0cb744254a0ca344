"""The built-in dataset formats, registered through the same hook as any plugin's."""

from __future__ import annotations

from mmhub.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from mmhub.data.captions import CaptionsDataset
    from mmhub.data.easy_vqa import EasyVQADataset
    from mmhub.data.easy_vqa_varied import EasyVQAVariedDataset
    from mmhub.data.llava_json import LlavaJsonDataset
    from mmhub.data.nlf import NLFDataset
    from mmhub.data.preference import PreferenceDataset
    from mmhub.data.sharegpt import ShareGPTDataset
    from mmhub.data.webdataset import WebDataset

    for cls in (LlavaJsonDataset, ShareGPTDataset, CaptionsDataset, PreferenceDataset, WebDataset, EasyVQADataset,
                NLFDataset, EasyVQAVariedDataset):
        register(cls)
