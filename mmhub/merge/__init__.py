"""Weight-space merging per component slot: `mmhub merge CONFIG.yaml --out DIR`.

`mmhub.merge.methods` holds the merge methods (a plugin kind: ``register_merge_methods``), `mmhub.merge.config` the
YAML's schema and `mmhub.merge.run` the pre-flight and the merge itself.
"""
