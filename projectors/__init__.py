"""Built-in input projectors (installed as ``mmhub.projectors``)."""
