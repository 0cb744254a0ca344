"""Data for training and evaluation: samples, dataset formats (plugins), mixtures, robust reading, pre-flight.

    from mmhub.data import load_dataset, robust, preflight
    ds = load_dataset({"type": "easy_vqa", "split": "train"})     # or a path, or a list (mixture)
    report = preflight(model, ds)                                  # raises InputError on bad data
    for sample in robust(ds):                                      # skips and counts bad samples
        ...

Formats are registered through the ``register_datasets`` hook; the built-ins are
``llava_json``, ``sharegpt``, ``captions``, ``preference``, ``webdataset`` and ``easy_vqa``.
"""

from mmhub.data.base import (
                             Dataset,
                             DatasetConfig,
                             InMemoryDataset,
                             MixtureDataset,
                             SampleError,
                             StreamingDataset,
                             load_dataset,
                             sniff_format,
)
from mmhub.data.preflight import PreflightReport, preflight
from mmhub.data.robust import RobustDataset, RobustStream, SkipLog, load_media, robust
from mmhub.data.sample import Sample, placeholder

__all__ = ["Sample", "placeholder", "Dataset", "DatasetConfig", "StreamingDataset", "InMemoryDataset", "MixtureDataset",
           "SampleError", "load_dataset", "sniff_format", "robust", "RobustDataset", "RobustStream", "SkipLog",
           "load_media", "preflight", "PreflightReport"]
