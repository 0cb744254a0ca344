"""Built-in modality encoders (installed as ``mmhub.encoders``)."""
